//! The file sink: rotated JSON Lines files, one line per entry.
//!
//! Files are named `<stream>.<group>.<consumer>.<start>-<n>.jsonl` (start in UTC, e.g.
//! `ml_events.warehouse.pod-1.20240115T163045.123Z-0001.jsonl`; characters other than
//! letters, digits, `.`, `-`, `_` and `@` become `_`). A file belongs to one replica and is
//! only ever appended to by it; a new file starts when the current one would grow past
//! `rotate_bytes`, or for the first batch after it is `rotate_interval` old.
//!
//! # One line per entry
//!
//! For each batch, in this order:
//!
//! 1. **Check** the markers `{<stream>}:warehouse:<group>:seen:<id>` (one GET per entry,
//!    pipelined on the store's connection). An entry with a marker is already in some
//!    replica's file: it is dropped as a duplicate, not written. Redis unreachable → the
//!    whole batch is retried (nothing was written).
//! 2. **Write** the other entries' lines in one `write` per file and `fsync` (plus the
//!    directory's when a file is created). Only lines that reached the disk go on; a failed
//!    write is cut back off the file and its entries are retried.
//! 3. **Mark** every written entry (`SET NX PX dedupe_window`), then report success: the
//!    runtime acknowledges only what was committed to disk *and* marked.
//!
//! Why write before marking: a marker set before the line is durable would, after a crash
//! in between, make the redelivery skip an entry that is nowhere — a silent loss.
//! Writing first means the opposite failure: **a crash (or a lost Redis connection) after
//! the fsync and before the marker is set leaves the line on disk without a marker, and the
//! redelivery — on whichever replica — writes it again: one duplicate line, with the same
//! `stream` and `id`, so a loader can drop it.** The window is one round trip long. Within
//! a live process the window closes: ids whose lines are written but whose markers could
//! not be set are remembered, and a retry that comes back to this replica only sets the
//! marker. The same duplicate can come from a disk so slow that a batch's write outlives
//! `handler_timeout`: the entries are retried while the blocked write may still land.
//!
//! A redelivery reaches a handler only after `claim_idle`, which `check` keeps above
//! `handler_timeout + max_wait`, so two replicas never write the same entry at the same
//! time. A marker lives `dedupe_window` (default 24 h): a dead letter replayed later than
//! that is written again.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;

use super::{Context, Recorder, WarehouseOptions};
use crate::jsonl::JsonlFile;
use crate::{Effects, Entry, EntryId, HandlerError, Store};

/// Ids written but not yet marked are remembered up to this many (beyond, the memory is
/// cleared: those entries may be written again on a retry).
const UNMARKED_CAP: usize = 100_000;

pub struct FileSink {
    store: Arc<dyn Store>,
    /// `{<stream>}:warehouse:<group>:seen:`
    marker_prefix: String,
    dedupe_window: Duration,
    recorder: Recorder,
    writer: Arc<Mutex<Writer>>,
    /// Written and fsynced, but the marker could not be set (Redis unreachable).
    unmarked: Mutex<HashSet<EntryId>>,
}

/// The marker key of an entry: in the stream's hash slot.
pub fn marker_key(stream: &str, group: &str, id: EntryId) -> String {
    format!("{}{id}", marker_prefix(stream, group))
}

/// `{<stream>}:warehouse:<group>:seen:`, the start of every marker key of a group.
fn marker_prefix(stream: &str, group: &str) -> String {
    format!("{}:warehouse:{group}:seen:", crate::slot_tag(stream))
}

/// What happens to one entry of the batch.
enum Plan {
    /// Done deciding: this is the result.
    Done(Result<Effects, HandlerError>),
    /// Write this line (index into the lines), then mark.
    Write(usize),
    /// Already written by this process; only the marker is missing.
    Mark,
}

impl FileSink {
    pub(super) fn new(
        options: &WarehouseOptions,
        context: &Context,
        recorder: Recorder,
    ) -> io::Result<Self> {
        let directory = options.directory();
        std::fs::create_dir_all(&directory).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create directory {}: {e}", directory.display()),
            )
        })?;
        let base = format!(
            "{}.{}.{}",
            file_name_part(&context.stream),
            file_name_part(&context.group),
            file_name_part(&context.consumer)
        );
        Ok(Self {
            store: Arc::clone(&context.store),
            marker_prefix: marker_prefix(&context.stream, &context.group),
            dedupe_window: options.dedupe_window(),
            recorder,
            writer: Arc::new(Mutex::new(Writer {
                directory,
                base,
                rotate_bytes: options.rotate_bytes(),
                rotate_interval: options.rotate_interval(),
                current: None,
                opened: 0,
            })),
            unmarked: Mutex::new(HashSet::new()),
        })
    }

    fn marker(&self, id: EntryId) -> String {
        format!("{}{id}", self.marker_prefix)
    }

    pub(super) async fn write_batch(
        &self,
        entries: &[Entry],
    ) -> Vec<Result<Effects, HandlerError>> {
        let ids: Vec<EntryId> = entries.iter().map(Entry::idempotency_id).collect();

        // 1. Which entries are already in some replica's file?
        let seen = join_all(ids.iter().map(|id| self.store.get(self.marker(*id)))).await;
        if let Some(Err(e)) = seen.iter().find(|r| r.is_err()) {
            let e = HandlerError::retry(format!(
                "warehouse: cannot check for duplicates, nothing written: {e}"
            ));
            return vec![Err(e); entries.len()];
        }
        let twice = super::duplicates_in_batch(&ids);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut plans = Vec::with_capacity(entries.len());
        {
            let unmarked = self.unmarked.lock().unwrap_or_else(|p| p.into_inner());
            for (i, entry) in entries.iter().enumerate() {
                let plan = if matches!(seen[i], Ok(Some(_))) {
                    Plan::Done(Err(super::already_stored(ids[i])))
                } else if twice[i] {
                    Plan::Done(Err(super::duplicate_in_batch(ids[i])))
                } else if unmarked.contains(&ids[i]) {
                    Plan::Mark
                } else {
                    let mut line = Vec::with_capacity(256);
                    match self.recorder.line(entry, &mut line) {
                        Ok(()) => {
                            lines.push(line);
                            Plan::Write(lines.len() - 1)
                        }
                        Err(e) => Plan::Done(Err(HandlerError::permanent(format!(
                            "warehouse: cannot encode the entry as JSON: {e}"
                        )))),
                    }
                };
                plans.push(plan);
            }
        }

        // 2. Write and fsync. `committed` lines (a prefix) are on disk.
        let (committed, error) = if lines.is_empty() {
            (0, None)
        } else {
            let writer = Arc::clone(&self.writer);
            let total = lines.len();
            let written = tokio::task::spawn_blocking(move || {
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                w.append(&lines, Instant::now(), SystemTime::now())
            })
            .await;
            match written {
                Ok((n, e)) => (n.min(total), e),
                Err(e) => (0, Some(io::Error::other(format!("the writer failed: {e}")))),
            }
        };
        if let Some(e) = &error {
            tracing::warn!(error = %e, written = committed, "warehouse: writing a batch failed; the rest is retried");
        }

        // 3. Mark what is on disk, then report.
        let to_mark: Vec<usize> = plans
            .iter()
            .enumerate()
            .filter(|(_, p)| match p {
                Plan::Write(line) => *line < committed,
                Plan::Mark => true,
                Plan::Done(_) => false,
            })
            .map(|(i, _)| i)
            .collect();
        let marks = join_all(
            to_mark
                .iter()
                .map(|&i| self.store.mark(self.marker(ids[i]), self.dedupe_window)),
        )
        .await;
        let mut marked = vec![None; entries.len()];
        for (&i, result) in to_mark.iter().zip(marks) {
            marked[i] = Some(result);
        }
        let mut unmarked = self.unmarked.lock().unwrap_or_else(|p| p.into_inner());
        let mut raced = 0usize;
        let results = plans
            .into_iter()
            .enumerate()
            .map(|(i, plan)| match (plan, marked[i].take()) {
                (Plan::Done(result), _) => result,
                (_, Some(Ok(first))) => {
                    unmarked.remove(&ids[i]);
                    raced += usize::from(!first);
                    Ok(Effects::new())
                }
                (_, Some(Err(e))) => {
                    if unmarked.len() >= UNMARKED_CAP {
                        unmarked.clear();
                    }
                    unmarked.insert(ids[i]);
                    Err(HandlerError::retry(format!(
                        "warehouse: written, but its marker could not be set (retried without writing again): {e}"
                    )))
                }
                (_, None) => Err(HandlerError::retry(format!(
                    "warehouse: not written: {}",
                    error
                        .as_ref()
                        .map_or_else(|| "unknown error".to_owned(), |e| e.to_string())
                ))),
            })
            .collect();
        if raced > 0 {
            tracing::warn!(
                entries = raced,
                "warehouse: entries were also written by another attempt at the same time; their lines are duplicated"
            );
        }
        results
    }
}

/// A stream, group or consumer name as part of a file name.
fn file_name_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The files of one group on this replica.
struct Writer {
    directory: PathBuf,
    base: String,
    rotate_bytes: u64,
    rotate_interval: Duration,
    current: Option<Current>,
    /// Files opened so far (their sequence numbers).
    opened: u32,
}

struct Current {
    file: JsonlFile,
    /// Lines for this file not yet written, and how many.
    pending: Vec<u8>,
    pending_lines: usize,
    opened_at: Instant,
}

impl Writer {
    /// Appends `lines` in order, rotating as needed, and fsyncs every file written to.
    /// Returns how many lines (from the first) are durably on disk, and the error that
    /// stopped the rest, if any.
    fn append(
        &mut self,
        lines: &[Vec<u8>],
        now: Instant,
        wall: SystemTime,
    ) -> (usize, Option<io::Error>) {
        let mut committed = 0;
        for line in lines {
            let rotate = self.current.as_ref().is_some_and(|c| {
                let size = c.file.len() + c.pending.len() as u64;
                (size > 0 && size + line.len() as u64 > self.rotate_bytes)
                    || now.duration_since(c.opened_at) >= self.rotate_interval
            });
            if rotate {
                match self.finish() {
                    Ok(n) => committed += n,
                    Err(e) => return (committed, Some(e)),
                }
            }
            if self.current.is_none() {
                match self.open(now, wall) {
                    Ok(c) => self.current = Some(c),
                    Err(e) => return (committed, Some(e)),
                }
            }
            let c = self
                .current
                .as_mut()
                .expect("a current file was just opened");
            c.pending.extend_from_slice(line);
            c.pending_lines += 1;
        }
        match self.flush() {
            Ok(n) => (committed + n, None),
            Err(e) => (committed, Some(e)),
        }
    }

    /// Writes and fsyncs the current file's pending lines; on failure cuts the file back
    /// to its last synced length and gives it up (the next batch starts a new file).
    fn flush(&mut self) -> io::Result<usize> {
        let Some(c) = self.current.as_mut() else {
            return Ok(0);
        };
        if c.pending.is_empty() {
            return Ok(0);
        }
        match c.file.append(&c.pending) {
            Ok(()) => {
                c.pending.clear();
                Ok(std::mem::take(&mut c.pending_lines))
            }
            Err(e) => {
                // The append cut the file back to its last synced length; give it up
                // (the next batch starts a new file).
                let c = self.current.take().expect("checked above");
                Err(io::Error::new(
                    e.kind(),
                    format!("writing {}: {e}", c.file.path().display()),
                ))
            }
        }
    }

    /// Flushes and closes the current file.
    fn finish(&mut self) -> io::Result<usize> {
        let n = self.flush()?;
        self.current = None;
        Ok(n)
    }

    fn open(&mut self, now: Instant, wall: SystemTime) -> io::Result<Current> {
        let start: String = humantime::format_rfc3339_millis(wall)
            .to_string()
            .chars()
            .filter(|c| !matches!(c, '-' | ':'))
            .collect();
        loop {
            self.opened += 1;
            let path = self
                .directory
                .join(format!("{}.{start}-{:04}.jsonl", self.base, self.opened));
            match JsonlFile::create_new(path.clone()) {
                Ok(file) => {
                    return Ok(Current {
                        file,
                        pending: Vec::new(),
                        pending_lines: 0,
                        opened_at: now,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("creating {}: {e}", path.display()),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonl::TempDir;
    use crate::warehouse::Context;
    use crate::{MemoryStore, PayloadFormat, StoreCall};
    use std::path::Path;

    fn sink(dir: &Path, store: Arc<MemoryStore>, rotate_bytes: u64) -> FileSink {
        let options = WarehouseOptions {
            directory: Some(dir.to_path_buf()),
            rotate_bytes: Some(rotate_bytes),
            ..Default::default()
        };
        let context = Context {
            stream: "user:logs".into(),
            group: "warehouse".into(),
            consumer: "pod/1".into(),
            concurrency: 64,
            store,
        };
        FileSink::new(
            &options,
            &context,
            Recorder {
                event_type: "event_type".into(),
            },
        )
        .unwrap()
    }

    fn entries(ids: &[u64]) -> Vec<Entry> {
        ids.iter()
            .map(|&ms| {
                crate::warehouse::tests::entry(
                    EntryId::new(ms, 0),
                    &[("event_type", "click"), ("n", &ms.to_string())],
                    &PayloadFormat::Fields,
                )
            })
            .collect()
    }

    fn all_lines(dir: &Path) -> Vec<String> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        names
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn writes_marks_and_skips_what_is_marked() {
        let dir = TempDir::new("warehouse");
        let store = Arc::new(MemoryStore::new());
        let s = sink(dir.path(), Arc::clone(&store), 1 << 20);
        let rt = runtime();
        let results = rt.block_on(s.write_batch(&entries(&[1, 2, 3])));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let marker = marker_key("user:logs", "warehouse", EntryId::new(2, 0));
        assert_eq!(marker, "{user:logs}:warehouse:warehouse:seen:2-0");
        assert!(store.value(&marker).is_some());
        // Delivered again, with one new entry and a duplicate inside the batch.
        let results = rt.block_on(s.write_batch(&entries(&[2, 4, 4])));
        assert!(
            matches!(results[0], Err(HandlerError::Drop(_))),
            "{results:?}"
        );
        assert!(results[1].is_ok());
        assert!(matches!(results[2], Err(HandlerError::Drop(_))));
        let lines = all_lines(dir.path());
        assert_eq!(lines.len(), 4, "{lines:?}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(
            names[0].starts_with("user_logs.warehouse.pod_1.") && names[0].ends_with("-0001.jsonl"),
            "{names:?}"
        );
    }

    #[test]
    fn rotation_keeps_files_under_rotate_bytes() {
        let dir = TempDir::new("warehouse");
        let s = sink(dir.path(), Arc::new(MemoryStore::new()), 300);
        let rt = runtime();
        let ids: Vec<u64> = (1..=10).collect();
        let results = rt.block_on(s.write_batch(&entries(&ids)));
        assert!(results.iter().all(Result::is_ok));
        let files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(files.len() >= 3, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 300);
        }
        let lines = all_lines(dir.path());
        let got: Vec<u64> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"]["n"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(got, ids, "every line once, in order");
    }

    #[test]
    fn a_failed_marker_is_retried_without_writing_again() {
        let dir = TempDir::new("warehouse");
        let store = Arc::new(MemoryStore::new());
        let s = sink(dir.path(), Arc::clone(&store), 1 << 20);
        let rt = runtime();
        store.fail(StoreCall::Mark, true);
        let results = rt.block_on(s.write_batch(&entries(&[7])));
        assert!(matches!(&results[0], Err(HandlerError::Retry(r)) if r.contains("marker")));
        store.fail(StoreCall::Mark, false);
        let results = rt.block_on(s.write_batch(&entries(&[7])));
        assert!(results[0].is_ok(), "{results:?}");
        assert_eq!(all_lines(dir.path()).len(), 1);
    }

    #[test]
    fn interval_rotation() {
        let dir = TempDir::new("warehouse");
        let mut w = Writer {
            directory: dir.path().to_path_buf(),
            base: "s.g.c".into(),
            rotate_bytes: 1 << 20,
            rotate_interval: Duration::from_secs(60),
            current: None,
            opened: 0,
        };
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        assert_eq!(w.append(&[b"a\n".to_vec()], t0, wall).0, 1);
        assert_eq!(
            w.append(&[b"b\n".to_vec()], t0 + Duration::from_secs(59), wall)
                .0,
            1
        );
        assert_eq!(
            w.append(&[b"c\n".to_vec()], t0 + Duration::from_secs(61), wall)
                .0,
            1
        );
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "s.g.c.20231114T221320.000Z-0001.jsonl",
                "s.g.c.20231114T221320.000Z-0002.jsonl"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(&names[0])).unwrap(),
            "a\nb\n"
        );
    }
}
