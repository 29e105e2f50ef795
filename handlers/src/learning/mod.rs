//! `handler = "learning"`: the learning consumer for `user:feedback` that the beta-readiness
//! write-up asks for. Each feedback event (a rating or a thumbs up/down about one response of
//! one model to one prompt) feeds three things:
//!
//! 1. **Aggregates in Redis**, returned as [`Effect`]s so that they are applied with the
//!    entry's acknowledgement and never twice: per model, per prompt, and per minute (the
//!    rolling window).
//! 2. **An RLHF-ready dataset**: one JSON Lines line per feedback in
//!    `<dataset_dir>/<group>/feedback-<YYYY-MM-DD>.jsonl` (UTC day of the feedback's
//!    original entry id), written and fsynced before the entry is reported done.
//! 3. **Adaptation events**: a periodic [`Handler::tick`] (one replica at a time) computes
//!    each model's rolling average rating over `window`; when it goes at or below
//!    `threshold` (with at least `min_feedback` ratings in the window) one event is added
//!    to `adaptations_stream`. A model fires again only after its rating has recovered above
//!    the threshold and then crossed it again.
//!
//! # Reading feedback
//!
//! Values are read with [`Entry::get`], so both payload shapes work: flat fields
//! (`rating`, `model`, …) and `payload = "json:event"` with dotted paths
//! (`rating = "feedback.score"`). `rating` is a number on `[rating_min, rating_max]`;
//! `thumbs` is up/down (`up`, `1`, `true`, `yes`, `+1`, `👍` / `down`, `0`, `false`, `no`,
//! `-1`, `👎`, case-insensitive), mapped to `rating_max` / `rating_min` when there is no
//! rating. An entry with neither is dropped (acknowledged, counted as `dropped`); a rating
//! that is not a number or outside the scale, or a thumbs value that is neither up nor
//! down, is permanent (dead-lettered: a producer bug to look at). A missing `model` is
//! aggregated as `unknown`. The prompt id is the `prompt_id` field when configured and
//! present, else [`prompt_id`] of the prompt text (the first 16 hex digits of its SHA-256);
//! without either there is no per-prompt aggregate for that entry.
//!
//! # Redis keys (the layout `streamworker stats` reads)
//!
//! Every key starts with `P = {<stream>}:learning:<group>` (the stream's hash slot); see
//! [`Keys`]. Aggregates are refreshed to live `retention` after their last write.
//!
//! | key | type | fields |
//! | --- | --- | --- |
//! | `P:model:<model>` | hash | `count`, `rating_sum`, `thumbs_up`, `thumbs_down` |
//! | `P:prompt:<prompt id>` | hash | `count`, `rating_sum`, `thumbs_up`, `thumbs_down` |
//! | `P:models` | hash | `<model>` → feedback count: the index of models |
//! | `P:minute:<unix minute>` | hash | `count:<model>`, `rating_sum:<model>`, `thumbs_up:<model>`, `thumbs_down:<model>` |
//! | `P:state:<model>` | string | JSON [`ModelState`]: the adaptation state the tick keeps |
//! | `P:written:<idempotency id>` | string | marker: the dataset line of that entry is on disk (lives `marker_ttl`) |
//!
//! `<unix minute>` is the entry's original id time in milliseconds divided by 60 000. A
//! field is absent rather than zero (no `thumbs_up` until the first thumbs up). The
//! average rating is `rating_sum / count`. `stats --since 1h` for a group sums the
//! `minute` hashes of the last 60 minutes ([`window_totals`] does exactly that for the
//! tick), reads `P:models` for the list of models and `P:model:<model>` for totals, and
//! `P:state:<model>` for whether a model is currently below the threshold.
//!
//! # The dataset and redeliveries
//!
//! The dataset line is a side effect outside Redis, so it is made idempotent by entry
//! ([`Entry::idempotency_id`]): after a batch's lines are written and fsynced, a marker
//! `P:written:<idempotency id>` is set with [`Store::mark`]. An entry that may have been
//! handled before (delivery count above 1, or a replayed dead letter) is first looked up:
//! marker present → its line is not written again; marker absent → the day's file is
//! searched for a complete line with that idempotency id (this catches the process that
//! died, or lost its connection, **between the write and the marker**), and only if none
//! is found is the line written. So on one host, or with a shared `dataset_dir`, a
//! redelivery never duplicates a line. The case left: a crash between write and marker,
//! with the redelivery handled by a replica that cannot see the first replica's files
//! (separate volumes). That replica writes the line again in its own file; both lines
//! carry the same `idempotency_id`, which a dataset reader dedupes on. A first delivery is
//! never looked up (no earlier attempt can have written it), so the hot path pays one
//! `SET NX` per entry and one fsync per batch. A marker that cannot be set is logged and
//! the entry still succeeds: the line is durable, and the marker only matters if this
//! delivery's acknowledgement is lost too. (One corner: a run that failed after its line
//! reached the disk — fsync error — while the circuit breaker was open gets its delivery
//! given back, so its redelivery looks like a first and may write the line again.)
//!
//! The same search covers a batch that timed out (`handler_timeout`) after its lines were
//! written. It reads the whole day file, once per batch that needs it, which only happens
//! on redeliveries.
//!
//! Several replicas may share `dataset_dir`: each batch is one `write` to a file opened
//! with `O_APPEND`, so lines never interleave on a local file system. A write that fails
//! part-way (disk full) leaves a partial last line; the next write starts on a new line,
//! the entry is retried, and the search above only accepts complete, parseable lines.
//!
//! # Adaptation events
//!
//! Fields: `model`, `rating` (the rolling average), `feedback` (ratings in the window),
//! `threshold`, `window`, `at` (RFC 3339, when the crossing was seen), `reason`, `stream`,
//! `group`. The per-model state is written before the event (`low`, not yet `emitted`) and
//! marked `emitted` after it, with [`Store::get`]/[`Store::set`]: a replica that takes the
//! tick over, or the next tick after a failed XADD, re-sends a crossing whose event is not
//! known to be out, with the same `at`, `rating` and `feedback` — at least once, and a
//! duplicate is identical (consumers can dedupe on `model` + `at`); such a re-send happens
//! when the model is next judged (at least `min_feedback` ratings in the window). The
//! state lives `retention` after its last change, so a model silent that long is judged
//! afresh. Concurrent ticks are ruled out by the runtime's tick lease, not here. The window
//! is judged with this process's clock against the entries' Redis-stamped minutes.
//!
//! # Layout
//!
//! - `options.rs`: `[groups.<name>.options]`, derived values and checks;
//! - `feedback.rs`: reading one feedback event from an entry, and its aggregate effects;
//! - `math.rs`: prompt ids, the rolling window's minutes, totals over buckets, formats;
//! - `state.rs`: a model's adaptation state and the judgement of one tick;
//! - `dataset.rs`: the JSON Lines dataset and its once-per-entry writes;
//! - this file: the key layout, the handler and its tick.

mod dataset;
mod feedback;
mod math;
mod options;
mod state;

pub use math::{Totals, prompt_id, window_range, window_totals};
pub use options::LearningOptions;
pub use state::ModelState;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;

use crate::{Batching, Effect, Effects, Entry, EntryId, Handler, HandlerError, ResultExt, Store};
use dataset::{Dataset, path_component, probe};
use math::number;
use state::{Step, judge};

/// The Redis keys of one learning group (the table in the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(stream: &str, group: &str) -> Self {
        Self {
            prefix: format!("{}:learning:{group}", crate::slot_tag(stream)),
        }
    }
    /// `{<stream>}:learning:<group>`
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn model(&self, model: &str) -> String {
        format!("{}:model:{model}", self.prefix)
    }
    pub fn prompt(&self, prompt_id: &str) -> String {
        format!("{}:prompt:{prompt_id}", self.prefix)
    }
    pub fn models(&self) -> String {
        format!("{}:models", self.prefix)
    }
    /// The bucket of the minute `unix_minute` (milliseconds / 60 000).
    pub fn minute(&self, unix_minute: u64) -> String {
        format!("{}:minute:{unix_minute}", self.prefix)
    }
    pub fn state(&self, model: &str) -> String {
        format!("{}:state:{model}", self.prefix)
    }
    pub fn written(&self, idempotency_id: EntryId) -> String {
        format!("{}:written:{idempotency_id}", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("learning: {0}")]
pub struct LearningBuildError(String);

/// The learning handler for one group.
pub struct Learning {
    options: LearningOptions,
    keys: Keys,
    stream: String,
    group: String,
    store: Arc<dyn Store>,
    dataset: Option<Arc<Dataset>>,
}

impl std::fmt::Debug for Learning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learning")
            .field("keys", &self.keys)
            .field("dataset", &self.dataset.as_ref().map(|d| &d.dir))
            .finish_non_exhaustive()
    }
}

impl Learning {
    /// Builds the handler; with a dataset, creates its directory and checks that it is
    /// writable, so a read-only or missing volume stops the group at startup (naming the
    /// directory) instead of failing every entry.
    pub fn new(
        options: &LearningOptions,
        stream: &str,
        group: &str,
        store: Arc<dyn Store>,
    ) -> Result<Self, LearningBuildError> {
        let dataset = if options.dataset_dir.is_empty() {
            None
        } else {
            let dir = Path::new(&options.dataset_dir).join(path_component(group));
            probe(&dir).map_err(|e| {
                LearningBuildError(format!(
                    "dataset_dir: cannot write to {}: {e} (mount a writable volume there, or set dataset_dir = \"\" for no dataset)",
                    dir.display()
                ))
            })?;
            Some(Arc::new(Dataset::new(dir)))
        };
        Ok(Self {
            options: options.clone(),
            keys: Keys::new(stream, group),
            stream: stream.to_owned(),
            group: group.to_owned(),
            store,
            dataset,
        })
    }

    /// The directory this group's dataset files are in, if it has a dataset.
    pub fn dataset_dir(&self) -> Option<&Path> {
        self.dataset.as_deref().map(|d| d.dir.as_path())
    }

    async fn process(&self, entries: &[Entry]) -> Vec<Result<Effects, HandlerError>> {
        let mut results = Vec::with_capacity(entries.len());
        let mut lines: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let result = self.feedback(entry).and_then(|f| {
                if self.dataset.is_some() {
                    lines.push((i, self.line(entry, &f)?));
                }
                Ok(self.effects(entry, &f))
            });
            results.push(result);
        }
        if let Some(dataset) = &self.dataset
            && !lines.is_empty()
        {
            self.write_lines(dataset, entries, lines, &mut results)
                .await;
        }
        results
    }

    async fn check(&self) -> Result<(), HandlerError> {
        let o = &self.options;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let keys: Vec<String> = window_range(now_ms, o.window)
            .map(|m| self.keys.minute(m))
            .collect();
        let buckets = self.store.hashes(keys).await.retryable()?;
        let judged: Vec<(String, Totals)> = window_totals(&buckets)
            .into_iter()
            .filter(|(_, t)| t.count >= o.min_feedback)
            .collect();
        let states = join_all(
            judged
                .iter()
                .map(|(model, _)| self.store.get(self.keys.state(model))),
        )
        .await;
        let mut first_error = None;
        for ((model, totals), state) in judged.iter().zip(states) {
            let Some(rating) = totals.average() else {
                continue;
            };
            let prev = match state {
                Ok(s) => s.and_then(|text| match serde_json::from_str::<ModelState>(&text) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(stream = %self.stream, group = %self.group, model = %model, error = %e, "ignoring an unreadable adaptation state");
                        None
                    }
                }),
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                    continue;
                }
            };
            let step = judge(prev.as_ref(), rating, totals.count, o.threshold, now_ms);
            if let Err(e) = self.take(model, step).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(HandlerError::retry(format!("learning: {e}"))),
        }
    }

    async fn take(&self, model: &str, step: Step) -> Result<(), String> {
        let key = self.keys.state(model);
        let ttl = Some(self.options.retention);
        let save = |state: &ModelState| serde_json::to_string(state).map_err(|e| e.to_string());
        match step {
            Step::Nothing => Ok(()),
            Step::Recover(state) => {
                tracing::info!(
                    stream = %self.stream, group = %self.group, model = %model,
                    rating = state.rating, feedback = state.feedback, threshold = self.options.threshold,
                    "a model's rolling rating recovered above the threshold"
                );
                self.store
                    .set(key, save(&state)?, ttl)
                    .await
                    .map_err(|e| e.to_string())
            }
            Step::Fire(mut state) | Step::Resend(mut state) => {
                self.store
                    .set(key.clone(), save(&state)?, ttl)
                    .await
                    .map_err(|e| e.to_string())?;
                self.store
                    .apply(vec![self.adaptation(model, &state)])
                    .await
                    .map_err(|e| format!("cannot add the adaptation event: {e}"))?;
                tracing::info!(
                    stream = %self.stream, group = %self.group, model = %model,
                    rating = state.rating, feedback = state.feedback, threshold = self.options.threshold,
                    adaptations_stream = %self.options.adaptations_stream,
                    "a model's rolling rating fell to the threshold: adaptation event sent"
                );
                state.emitted = true;
                self.store
                    .set(key, save(&state)?, ttl)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn adaptation(&self, model: &str, state: &ModelState) -> Effect {
        let o = &self.options;
        let window = crate::duration::format(o.window);
        let rating = number(state.rating);
        let threshold = number(o.threshold);
        let reason = format!(
            "rolling average rating {rating} over the last {window} ({} ratings) is at or below the threshold {threshold}",
            state.feedback
        );
        let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(state.at_ms))
            .to_string();
        let fields = [
            ("model", model.to_owned()),
            ("rating", rating),
            ("feedback", state.feedback.to_string()),
            ("threshold", threshold),
            ("window", window),
            ("at", at),
            ("reason", reason),
            ("stream", self.stream.clone()),
            ("group", self.group.clone()),
        ];
        Effect::StreamAdd {
            key: o.adaptations_stream.clone(),
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
                .collect(),
            max_len: (o.adaptations_max_len > 0).then_some(o.adaptations_max_len),
        }
    }
}

impl Handler for Learning {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        self.process(std::slice::from_ref(entry))
            .await
            .pop()
            .unwrap_or_else(|| Err(HandlerError::retry("learning: no result")))
    }

    fn batching(&self) -> Option<Batching> {
        Some(Batching {
            max_entries: self.options.max_batch,
            max_wait: self.options.max_wait,
        })
    }

    async fn handle_batch(&self, entries: &[Entry]) -> Vec<Result<Effects, HandlerError>> {
        self.process(entries).await
    }

    fn tick_every(&self) -> Option<Duration> {
        Some(self.options.check_every)
    }

    async fn tick(&self) -> Result<(), HandlerError> {
        self.check().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use crate::MemoryStore;
    use crate::PayloadFormat;
    use math::MINUTE_MS;

    pub(super) fn limits() -> Limits {
        Limits {
            handler_timeout: Duration::from_secs(30),
            claim_idle: Duration::from_secs(120),
        }
    }

    pub(super) fn entry(id: EntryId, delivery_count: u64, pairs: &[(&str, &str)]) -> Entry {
        Entry::for_test(
            "user:feedback",
            "learning",
            id,
            delivery_count,
            pairs,
            &PayloadFormat::Fields,
        )
    }

    pub(super) fn handler(dir: &Path, store: Arc<MemoryStore>) -> Learning {
        let options = LearningOptions {
            dataset_dir: dir.to_string_lossy().into_owned(),
            ..Default::default()
        };
        Learning::new(&options, "user:feedback", "learning", store).unwrap()
    }

    pub(super) fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_tick_sends_one_event_per_crossing() {
        let store = Arc::new(MemoryStore::new());
        let options = LearningOptions {
            dataset_dir: String::new(),
            min_feedback: 3,
            window: Duration::from_secs(600),
            ..Default::default()
        };
        let h = Learning::new(&options, "user:feedback", "learning", store.clone()).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        store.set_hash(
            &h.keys.minute(now / MINUTE_MS),
            [
                ("count:bad", "4"),
                ("rating_sum:bad", "8"),
                ("count:good", "4"),
                ("rating_sum:good", "18"),
                ("count:few", "2"),
                ("rating_sum:few", "2"),
            ],
        );
        let rt = rt();
        rt.block_on(h.tick()).unwrap();
        rt.block_on(h.tick()).unwrap();
        let applied = store.applied();
        assert_eq!(applied.len(), 1, "{applied:?}");
        let Effect::StreamAdd { key, fields, .. } = &applied[0] else {
            panic!("{applied:?}")
        };
        assert_eq!(key, "ai:adaptations");
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("model").as_deref(), Some("bad"));
        assert_eq!(get("rating").as_deref(), Some("2"));
        assert_eq!(get("feedback").as_deref(), Some("4"));
        assert_eq!(get("window").as_deref(), Some("10m"));
        let state: ModelState =
            serde_json::from_str(&store.value(&h.keys.state("bad")).unwrap()).unwrap();
        assert!(state.low && state.emitted);
    }
}
