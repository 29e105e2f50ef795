//! `stats` for `handler = "analytics"`: merges the minute hashes in range (layout in
//! `streamworker_handlers::analytics`) into totals, per event type, per dimension value,
//! sums and latency percentiles.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use streamworker_handlers::analytics::{
    AnalyticsOptions, Field, Histogram, Metric, RELATIVE_ERROR, minute_key,
};

use crate::admin::{human, table};
use crate::client::{Client, ClientError};
use crate::config::GroupConfig;

use super::{Query, minutes, read_hashes};

/// Aggregates of a set of entries (all of them, or one dimension value's).
#[derive(Debug, Default)]
struct Totals {
    entries: u64,
    errors: u64,
    types: BTreeMap<String, u64>,
    sums: BTreeMap<String, f64>,
    latency: Histogram,
}

/// `map[key]`, inserted with its default when missing; allocates only then.
fn slot<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: Cow<'_, str>) -> &'m mut V {
    if !map.contains_key(key.as_ref()) {
        map.insert(key.clone().into_owned(), V::default());
    }
    map.get_mut(key.as_ref()).expect("just inserted")
}

impl Totals {
    fn add(&mut self, metric: Metric<'_>, value: &str) {
        let count = || value.parse::<u64>().unwrap_or(0);
        let amount = || value.parse::<f64>().ok().filter(|x| x.is_finite());
        match metric {
            Metric::Entries => self.entries += count(),
            Metric::Errors => self.errors += count(),
            Metric::Type(t) => *slot(&mut self.types, t) += count(),
            Metric::Sum(path) => {
                if let Some(x) = amount() {
                    *slot(&mut self.sums, path) += x;
                }
            }
            Metric::LatencySum => self.latency.sum += amount().unwrap_or(0.0),
            Metric::LatencyBucket(b) => self.latency.add(b, count()),
        }
    }
}

/// Every minute in range, merged.
#[derive(Debug, Default)]
struct Merged {
    minutes_with_data: u64,
    total: Totals,
    /// dimension path → value → aggregates.
    dimensions: BTreeMap<String, BTreeMap<String, Totals>>,
}

impl Merged {
    fn add_minute(&mut self, hash: Vec<(String, String)>) {
        self.minutes_with_data += 1;
        for (name, value) in hash {
            match Field::parse(&name) {
                Some(Field::Total(metric)) => self.total.add(metric, &value),
                Some(Field::Dimension {
                    path,
                    value: dim_value,
                    metric,
                }) => slot(slot(&mut self.dimensions, path), dim_value).add(metric, &value),
                None => {}
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    stream: String,
    group: String,
    /// The window asked for, e.g. "1h".
    since: String,
    /// Start of the first minute read (RFC 3339) and the server's time.
    from: String,
    to: String,
    minutes: u64,
    minutes_with_data: u64,
    retention: String,
    entries: u64,
    errors: u64,
    /// errors / entries; null without entries.
    error_rate: Option<f64>,
    event_types: BTreeMap<String, u64>,
    sums: BTreeMap<String, f64>,
    latency_path: Option<String>,
    latency_ms: Option<Latency>,
    dimensions: BTreeMap<String, DimensionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    /// The sums in configuration order, then any others found.
    #[serde(skip)]
    sum_order: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Latency {
    count: u64,
    /// Exact: sum / count.
    avg: f64,
    min: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    /// Bound on the relative error of min, p50, p95, p99 and max (values above 1 ms).
    relative_error: f64,
}

fn latency(h: &Histogram) -> Option<Latency> {
    Some(Latency {
        count: h.count(),
        avg: h.mean()?,
        min: h.min()?,
        p50: h.quantile(0.50)?,
        p95: h.quantile(0.95)?,
        p99: h.quantile(0.99)?,
        max: h.max()?,
        relative_error: RELATIVE_ERROR,
    })
}

#[derive(Debug, Serialize)]
struct DimensionReport {
    /// Distinct values seen in the window.
    distinct: usize,
    /// Entries of the values not shown (beyond --top).
    other_entries: u64,
    /// The values with the most entries, most first.
    values: Vec<ValueReport>,
}

#[derive(Debug, Serialize)]
struct ValueReport {
    value: String,
    entries: u64,
    errors: u64,
    error_rate: Option<f64>,
    event_types: BTreeMap<String, u64>,
    sums: BTreeMap<String, f64>,
    latency_ms: Option<Latency>,
}

fn rate(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub async fn run(
    client: &Client,
    group: &GroupConfig,
    options: &AnalyticsOptions,
    query: &Query,
) -> Result<String, ClientError> {
    let now_ms = client.time_ms().await?;
    let range = minutes(now_ms, query.since);
    let keys: Vec<String> = range
        .clone()
        .map(|m| minute_key(&group.stream, &group.name, m))
        .collect();
    let mut merged = Merged::default();
    read_hashes(client, keys, |hash| merged.add_minute(hash)).await?;
    let report = report(group, options, query, now_ms, range, merged);
    if query.json {
        return Ok(serde_json::to_string_pretty(&report).expect("the report serializes") + "\n");
    }
    Ok(render(&report))
}

fn report(
    group: &GroupConfig,
    options: &AnalyticsOptions,
    query: &Query,
    now_ms: u64,
    range: std::ops::RangeInclusive<u64>,
    merged: Merged,
) -> Report {
    let Merged {
        minutes_with_data,
        mut total,
        mut dimensions,
    } = merged;
    // Configured sums and dimensions always appear, so the shape does not depend on the data.
    for path in &options.sums {
        total.sums.entry(path.clone()).or_default();
    }
    for path in &options.dimensions {
        dimensions.entry(path.clone()).or_default();
    }
    let mut sum_order = options.sums.clone();
    sum_order.extend(
        total
            .sums
            .keys()
            .filter(|k| !options.sums.contains(k))
            .cloned(),
    );
    let dimensions = dimensions
        .into_iter()
        .map(|(path, values)| {
            let distinct = values.len();
            let mut values: Vec<(String, Totals)> = values.into_iter().collect();
            values.sort_by(|a, b| b.1.entries.cmp(&a.1.entries).then_with(|| a.0.cmp(&b.0)));
            let shown = if query.top == 0 {
                values.len()
            } else {
                query.top.min(values.len())
            };
            let other_entries = values[shown..].iter().map(|(_, t)| t.entries).sum();
            values.truncate(shown);
            let values = values
                .into_iter()
                .map(|(value, t)| ValueReport {
                    value,
                    entries: t.entries,
                    errors: t.errors,
                    error_rate: rate(t.errors, t.entries),
                    latency_ms: latency(&t.latency),
                    event_types: t.types,
                    sums: t.sums,
                })
                .collect();
            (
                path,
                DimensionReport {
                    distinct,
                    other_entries,
                    values,
                },
            )
        })
        .collect();
    Report {
        stream: group.stream.clone(),
        group: group.name.clone(),
        since: human(query.since),
        from: rfc3339(range.start() * super::MINUTE_MS),
        to: rfc3339(now_ms),
        minutes: range.end() - range.start() + 1,
        minutes_with_data,
        retention: human(options.retention),
        entries: total.entries,
        errors: total.errors,
        error_rate: rate(total.errors, total.entries),
        latency_ms: latency(&total.latency),
        latency_path: options.latency.clone(),
        event_types: total.types,
        sums: total.sums,
        dimensions,
        note: (query.since > options.retention).then(|| {
            format!(
                "aggregates are kept {} after their minute, less than the {} asked for",
                human(options.retention),
                human(query.since)
            )
        }),
        sum_order,
    }
}

/// Milliseconds for people: "0.4 ms", "812 ms", "12.3 s".
fn ms(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.1} ms")
    } else if x < 10_000.0 {
        format!("{x:.0} ms")
    } else {
        format!("{:.1} s", x / 1000.0)
    }
}

/// Sums for people: integers as integers, small amounts (costs) with four decimals.
fn amount(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x.abs() >= 1000.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

fn percent(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{:.2} %", r * 100.0))
}

/// "llm_call 950, error 50": most first.
fn types(types: &BTreeMap<String, u64>) -> String {
    let mut list: Vec<(&String, &u64)> = types.iter().collect();
    list.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    list.iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render(r: &Report) -> String {
    let mut out = format!(
        "{} / {}: last {} ({} → {}), {} of {} minutes with data\n",
        r.stream, r.group, r.since, r.from, r.to, r.minutes_with_data, r.minutes
    );
    if r.entries == 0 {
        out.push_str(&format!(
            "no entries aggregated in this window (aggregates are kept {} after their minute; is a daemon running this group?)\n",
            r.retention
        ));
        return out;
    }
    let mut rows = vec![
        vec!["entries".into(), r.entries.to_string()],
        vec![
            "errors".into(),
            format!("{} ({})", r.errors, percent(r.error_rate)),
        ],
        vec!["event types".into(), types(&r.event_types)],
    ];
    for path in &r.sum_order {
        rows.push(vec![format!("sum {path}"), amount(r.sums[path])]);
    }
    if let Some(l) = &r.latency_ms {
        rows.push(vec![
            format!("latency {}", r.latency_path.as_deref().unwrap_or("")),
            format!(
                "{} values: avg {}, p50 {}, p95 {}, p99 {}, min {}, max {} (all but avg ±{:.1} %)",
                l.count,
                ms(l.avg),
                ms(l.p50),
                ms(l.p95),
                ms(l.p99),
                ms(l.min),
                ms(l.max),
                l.relative_error * 100.0
            ),
        ]);
    }
    // Two columns without a header line.
    let text = table(&["", ""], &rows);
    for line in text.lines().skip(1) {
        out.push_str(line);
        out.push('\n');
    }
    for (path, d) in &r.dimensions {
        out.push_str(&format!(
            "\nby {path}: {} value{}",
            d.distinct,
            if d.distinct == 1 { "" } else { "s" }
        ));
        if d.values.len() < d.distinct {
            out.push_str(&format!(
                ", top {} shown ({} entries in the others; --top to see more)",
                d.values.len(),
                d.other_entries
            ));
        }
        out.push('\n');
        if d.values.is_empty() {
            continue;
        }
        let sums: Vec<&String> = r.sum_order.iter().collect();
        let measured = d
            .values
            .iter()
            .any(|v| !v.sums.is_empty() || v.latency_ms.is_some());
        let mut header: Vec<String> = ["VALUE", "ENTRIES", "ERRORS", "ERROR RATE", "TYPES"]
            .map(String::from)
            .to_vec();
        if measured {
            header.extend(sums.iter().map(|s| s.to_string()));
            header.extend(["AVG".into(), "P95".into()]);
        }
        let rows: Vec<Vec<String>> = d
            .values
            .iter()
            .map(|v| {
                let mut row = vec![
                    v.value.clone(),
                    v.entries.to_string(),
                    v.errors.to_string(),
                    percent(v.error_rate),
                    types(&v.event_types),
                ];
                if measured {
                    row.extend(
                        sums.iter()
                            .map(|s| v.sums.get(*s).map_or("-".into(), |x| amount(*x))),
                    );
                    row.push(v.latency_ms.as_ref().map_or("-".into(), |l| ms(l.avg)));
                    row.push(v.latency_ms.as_ref().map_or("-".into(), |l| ms(l.p95)));
                }
                row
            })
            .collect();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        for line in table(&header, &rows).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(note) = &r.note {
        out.push_str(&format!("\nnote: {note}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_merge_into_totals_and_dimensions() {
        let mut m = Merged::default();
        let hash = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        m.add_minute(hash(&[
            ("n", "3"),
            ("err", "1"),
            ("type|llm_call", "2"),
            ("type|error", "1"),
            ("sum|data.cost_usd", "0.5"),
            ("lat|sum", "300"),
            ("lat|50", "2"),
            ("dim|data.model|gpt%7C4|n", "3"),
            ("dim|data.model|gpt%7C4|type|llm_call", "2"),
            ("future|field", "1"),
        ]));
        m.add_minute(hash(&[
            ("n", "1"),
            ("sum|data.cost_usd", "0.25"),
            ("lat|60", "1"),
            ("lat|sum", "400"),
        ]));
        assert_eq!(m.minutes_with_data, 2);
        assert_eq!(m.total.entries, 4);
        assert_eq!(m.total.errors, 1);
        assert_eq!(m.total.sums["data.cost_usd"], 0.75);
        assert_eq!(m.total.latency.count(), 3);
        assert_eq!(m.total.latency.mean(), Some(700.0 / 3.0));
        let gpt = &m.dimensions["data.model"]["gpt|4"];
        assert_eq!((gpt.entries, gpt.types["llm_call"]), (3, 2));
    }
}
