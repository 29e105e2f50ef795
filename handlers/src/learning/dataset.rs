//! The RLHF dataset: one JSON Lines line per feedback in
//! `<dataset_dir>/<group>/feedback-<YYYY-MM-DD>.jsonl`, written and fsynced before the entry
//! is reported done, and written once per entry (markers, then a search of the day's file).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use serde::Serialize;

use super::Learning;
use super::feedback::{Feedback, Thumbs};
use super::math::day;
use crate::jsonl::JsonlFile;
use crate::{Effects, Entry, HandlerError, ResultExt};

/// One dataset line.
#[derive(Serialize)]
struct Line<'a> {
    prompt: Option<&'a str>,
    response: Option<&'a str>,
    rating: f64,
    thumbs: Option<&'static str>,
    model: &'a str,
    user: Option<&'a str>,
    prompt_id: Option<&'a str>,
    stream: &'a str,
    id: String,
    idempotency_id: String,
    time: String,
}

const ID_NEEDLE: &[u8] = b"\"idempotency_id\":\"";

/// Creates `dir` and a file in it (removed again).
pub(super) fn probe(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(".probe-{}", std::process::id()));
    File::create(&path)?;
    std::fs::remove_file(&path)
}

/// A group name as one safe path component: bytes outside `[A-Za-z0-9_.-]` (and a leading
/// dot) percent-encoded.
pub(super) fn path_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// The dataset files of one group. Blocking I/O: called from `spawn_blocking`.
pub(super) struct Dataset {
    pub(super) dir: PathBuf,
    /// The file most recently appended to, kept open.
    current: Mutex<Option<(String, JsonlFile)>>,
}

impl Dataset {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            current: Mutex::new(None),
        }
    }

    fn path(&self, day: &str) -> PathBuf {
        self.dir.join(format!("feedback-{day}.jsonl"))
    }

    /// Appends `lines` (whole lines) to the day's file in one write, then fsyncs. The
    /// file is shared with the replicas that use the same `dataset_dir`.
    fn append(&self, day: &str, lines: &[u8]) -> io::Result<()> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|(d, _)| d != day) {
            *current = None;
            *current = Some((day.to_owned(), JsonlFile::open_shared(self.path(day))?));
        }
        let Some((_, file)) = current.as_mut() else {
            return Err(io::Error::other("no open dataset file"));
        };
        let result = file.append(lines);
        if result.is_err() {
            // Reopen next time, which looks at how the file ends.
            *current = None;
        }
        result
    }

    /// Which of `ids` (idempotency ids) have a complete line in the day's file.
    fn find(&self, day: &str, ids: &HashSet<String>) -> io::Result<HashSet<String>> {
        let mut found = HashSet::new();
        let file = match File::open(self.path(day)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                break; // a torn last line does not count
            }
            let Some(at) = find_bytes(&line, ID_NEEDLE) else {
                continue;
            };
            let rest = &line[at + ID_NEEDLE.len()..];
            let Some(end) = rest.iter().position(|&b| b == b'"') else {
                continue;
            };
            let Ok(id) = std::str::from_utf8(&rest[..end]) else {
                continue;
            };
            if ids.contains(id) && serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_ok() {
                found.insert(id.to_owned());
            }
        }
        Ok(found)
    }
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Learning {
    pub(super) fn line(&self, entry: &Entry, f: &Feedback<'_>) -> Result<Vec<u8>, HandlerError> {
        let original = entry.idempotency_id();
        let line = Line {
            prompt: f.prompt.as_deref(),
            response: f.response.as_deref(),
            rating: f.rating,
            thumbs: f.thumbs.map(Thumbs::name),
            model: &f.model,
            user: f.user.as_deref(),
            prompt_id: f.prompt_id.as_deref(),
            stream: &self.stream,
            id: entry.id.to_string(),
            idempotency_id: original.to_string(),
            time: humantime::format_rfc3339_millis(original.time()).to_string(),
        };
        let mut bytes = serde_json::to_vec(&line).permanent()?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Writes the lines not already written, fsyncs, then sets their markers. Entries whose
    /// line could not be written (or checked) fail retryably.
    pub(super) async fn write_lines(
        &self,
        dataset: &Arc<Dataset>,
        entries: &[Entry],
        mut lines: Vec<(usize, Vec<u8>)>,
        results: &mut [Result<Effects, HandlerError>],
    ) {
        // Entries an earlier attempt may have written: look for their marker, then in
        // the files.
        let maybe: Vec<usize> = lines
            .iter()
            .map(|(i, _)| *i)
            .filter(|&i| entries[i].delivery_count > 1 || entries[i].replay_of().is_some())
            .collect();
        let mut on_disk: Vec<usize> = Vec::new();
        if !maybe.is_empty() {
            let looked = join_all(maybe.iter().map(|&i| {
                self.store
                    .get(self.keys.written(entries[i].idempotency_id()))
            }))
            .await;
            let mut marked = HashSet::new();
            let mut unknown: BTreeMap<String, HashMap<String, usize>> = BTreeMap::new();
            for (&i, found) in maybe.iter().zip(looked) {
                match found {
                    Ok(Some(_)) => {
                        marked.insert(i);
                    }
                    Ok(None) => {
                        let id = entries[i].idempotency_id();
                        unknown
                            .entry(day(id))
                            .or_default()
                            .insert(id.to_string(), i);
                    }
                    Err(e) => {
                        results[i] = Err(HandlerError::retry(format!(
                            "learning: cannot check whether the dataset line was written: {e}"
                        )));
                        marked.insert(i);
                    }
                }
            }
            if !unknown.is_empty() {
                let ds = Arc::clone(dataset);
                let wanted = unknown.clone();
                let found = tokio::task::spawn_blocking(move || {
                    wanted
                        .into_iter()
                        .map(|(day, ids)| {
                            let ids: HashSet<String> = ids.into_keys().collect();
                            (day.clone(), ds.find(&day, &ids))
                        })
                        .collect::<Vec<_>>()
                })
                .await;
                match found {
                    Ok(found) => {
                        for (day, found) in found {
                            let ids = &unknown[&day];
                            match found {
                                Ok(found) => {
                                    on_disk.extend(found.iter().filter_map(|id| ids.get(id)));
                                }
                                Err(e) => {
                                    for &i in ids.values() {
                                        results[i] = Err(HandlerError::retry(format!(
                                            "learning: cannot search {} for an earlier line: {e}",
                                            dataset.path(&day).display()
                                        )));
                                        marked.insert(i);
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        for ids in unknown.values() {
                            for &i in ids.values() {
                                results[i] = Err(HandlerError::retry(format!(
                                    "learning: the dataset search failed: {e}"
                                )));
                                marked.insert(i);
                            }
                        }
                    }
                }
            }
            lines.retain(|(i, _)| !marked.contains(i) && !on_disk.contains(i));
        }

        // Append the rest, one write and one fsync per day file.
        let mut by_day: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for (i, line) in lines {
            let slot = by_day.entry(day(entries[i].idempotency_id())).or_default();
            slot.0.push(i);
            slot.1.extend_from_slice(&line);
        }
        let mut written: Vec<usize> = on_disk;
        if !by_day.is_empty() {
            let ds = Arc::clone(dataset);
            let batches: Vec<(String, Vec<u8>)> = by_day
                .iter_mut()
                .map(|(day, (_, bytes))| (day.clone(), std::mem::take(bytes)))
                .collect();
            let outcome = tokio::task::spawn_blocking(move || {
                batches
                    .iter()
                    .map(|(day, bytes)| ds.append(day, bytes))
                    .collect::<Vec<_>>()
            })
            .await;
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => (0..by_day.len())
                    .map(|_| Err(io::Error::other(e.to_string())))
                    .collect(),
            };
            for ((day, (indices, _)), result) in by_day.iter().zip(outcome) {
                match result {
                    Ok(()) => written.extend(indices),
                    Err(e) => {
                        for &i in indices {
                            results[i] = Err(HandlerError::retry(format!(
                                "learning: cannot write the dataset line to {}: {e}",
                                dataset.path(day).display()
                            )));
                        }
                    }
                }
            }
        }

        // Markers, so a redelivery does not write the line again.
        if written.is_empty() {
            return;
        }
        let marks = join_all(written.iter().map(|&i| {
            self.store.mark(
                self.keys.written(entries[i].idempotency_id()),
                self.options.marker_ttl,
            )
        }))
        .await;
        let failed: Vec<_> = marks.into_iter().filter_map(Result::err).collect();
        if let Some(e) = failed.first() {
            tracing::warn!(
                stream = %self.stream, group = %self.group, error = %e, entries = failed.len(),
                "could not mark dataset lines as written; the lines are on disk, and a redelivery will look for them in the files"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EntryId;
    use crate::Handler;
    use crate::MemoryStore;
    use crate::jsonl::TempDir;
    use crate::learning::LearningOptions;
    use crate::learning::prompt_id;
    use crate::learning::tests::{entry, handler, rt};
    use std::io::Write;

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for f in std::fs::read_dir(dir.join("learning")).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            for l in text.lines() {
                out.push(serde_json::from_str(l).unwrap());
            }
        }
        out
    }

    #[test]
    fn dataset_lines_are_written_once_per_feedback() {
        let dir = TempDir::new("learning");
        let store = Arc::new(MemoryStore::new());
        let h = handler(dir.path(), Arc::clone(&store));
        let id = EntryId::new(1_700_000_000_000, 0);
        let e = entry(
            id,
            1,
            &[
                ("rating", "2"),
                ("model", "m"),
                ("prompt", "why?"),
                ("response", "because"),
                ("user", "u1"),
            ],
        );
        let rt = rt();
        let r = rt.block_on(h.handle_batch(std::slice::from_ref(&e)));
        assert!(r[0].is_ok(), "{r:?}");
        let got = lines(dir.path());
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0],
            serde_json::json!({
                "prompt": "why?", "response": "because", "rating": 2.0, "thumbs": null,
                "model": "m", "user": "u1", "prompt_id": prompt_id("why?"),
                "stream": "user:feedback", "id": "1700000000000-0",
                "idempotency_id": "1700000000000-0", "time": "2023-11-14T22:13:20.000Z"
            })
        );
        assert!(store.value(&h.keys.written(id)).is_some());

        // A redelivery with the marker: no second line.
        let again = entry(id, 2, &[("rating", "2"), ("model", "m")]);
        assert!(rt.block_on(h.handle(&again)).is_ok());
        assert_eq!(lines(dir.path()).len(), 1);

        // A redelivery after a crash between write and marker: found in the file.
        store.remove(&h.keys.written(id));
        assert!(rt.block_on(h.handle(&again)).is_ok());
        assert_eq!(lines(dir.path()).len(), 1);
        assert!(
            store.value(&h.keys.written(id)).is_some(),
            "the marker is set for the line found on disk"
        );

        // A torn last line (a failed write) is neither counted nor glued to the next one.
        let path = h.dataset.as_ref().unwrap().path(&day(id));
        *h.dataset.as_ref().unwrap().current.lock().unwrap() = None;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"prompt":"x","idempotency_id":"1700000000000-1""#)
            .unwrap();
        let torn = entry(EntryId::new(1_700_000_000_000, 1), 2, &[("rating", "3")]);
        assert!(rt.block_on(h.handle(&torn)).is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        let whole: Vec<&str> = text
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
            .collect();
        assert_eq!(whole.len(), 2, "{text}");
        assert!(whole[1].contains("\"idempotency_id\":\"1700000000000-1\""));
    }

    #[test]
    fn an_unwritable_dataset_dir_fails_at_startup() {
        let dir = TempDir::new("learning");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let options = LearningOptions {
            dataset_dir: file.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let store = Arc::new(MemoryStore::new());
        let e = Learning::new(&options, "s", "g", store).unwrap_err();
        assert!(
            e.to_string().contains("dataset_dir: cannot write to"),
            "{e}"
        );
    }
}
