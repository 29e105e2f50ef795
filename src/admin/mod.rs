//! The commands operators reach for: `status`, `dlq`, `stats`, `pending`, `rewind` and
//! `pause`/`resume`.
//! They read and change Redis only through `client`, like the daemon.

pub mod dlq;
pub mod pause;
pub mod pending;
pub mod rewind;
pub mod stats;
pub mod status;

use std::time::Duration;

/// `1h30m` → "1h 30m"; sub-second values keep milliseconds.
pub fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        streamworker_handlers::duration::format(Duration::from_secs(d.as_secs()))
    } else {
        streamworker_handlers::duration::format(Duration::from_millis(d.as_millis() as u64))
    }
}

/// A field of an entry as text (invalid UTF-8 replaced); empty when missing.
pub fn field(fields: &[(Vec<u8>, Vec<u8>)], name: &str) -> String {
    fields
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Pads cells into aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}
