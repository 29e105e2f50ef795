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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    Batching, Derived, Effect, Effects, Entry, EntryId, Handler, HandlerError, Limits, Needs,
    OptionProblem, ResultExt, Store,
};

/// `[groups.<name>.options]` for `handler = "learning"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearningOptions {
    /// Field (or JSON path) holding the numeric rating.
    pub rating: String,
    /// Field holding a thumbs up/down, used as `rating_max`/`rating_min` when there is no
    /// rating, and counted in `thumbs_up`/`thumbs_down`.
    pub thumbs: String,
    /// Field holding the prompt text.
    pub prompt: String,
    /// Field holding the model's response.
    pub response: String,
    /// Field holding the model name; feedback without one is aggregated as `unknown`.
    pub model: String,
    /// Field holding the user id (copied to the dataset, not aggregated).
    pub user: String,
    /// Field holding a prompt id; unset (or missing in an entry): a hash of the prompt text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    /// The bottom of the rating scale (what a thumbs down counts as).
    pub rating_min: f64,
    /// The top of the rating scale (what a thumbs up counts as).
    pub rating_max: f64,
    /// Where the JSON Lines dataset goes (relative to the working directory); `""` for no
    /// dataset.
    pub dataset_dir: String,
    /// How long a dataset marker lives; must outlive any redelivery (> `claim_idle`), and a
    /// replay after that is checked against the files only.
    #[serde(with = "crate::duration")]
    pub marker_ttl: Duration,
    /// The stream adaptation events are added to.
    pub adaptations_stream: String,
    /// `MAXLEN ~` for the adaptations stream; 0 for no cap.
    pub adaptations_max_len: u64,
    /// A model whose rolling average rating is at or below this needs adaptation.
    pub threshold: f64,
    /// The rolling window, whole minutes (per-minute buckets by entry time).
    #[serde(with = "crate::duration")]
    pub window: Duration,
    /// Ratings a model needs in the window before it is judged.
    pub min_feedback: u64,
    /// How often the rolling ratings are checked (one replica at a time).
    #[serde(with = "crate::duration")]
    pub check_every: Duration,
    /// How long aggregates (and the per-minute buckets `stats` reads) live after their last
    /// write; at least `window`.
    #[serde(with = "crate::duration")]
    pub retention: Duration,
    /// Entries handled together (one fsync, one round of markers).
    pub max_batch: usize,
    /// How long the first entry of a batch waits for more.
    #[serde(with = "crate::duration")]
    pub max_wait: Duration,
}

impl Default for LearningOptions {
    fn default() -> Self {
        Self {
            rating: "rating".into(),
            thumbs: "thumbs".into(),
            prompt: "prompt".into(),
            response: "response".into(),
            model: "model".into(),
            user: "user".into(),
            prompt_id: None,
            rating_min: 1.0,
            rating_max: 5.0,
            dataset_dir: "learning".into(),
            marker_ttl: Duration::from_secs(24 * 3600),
            adaptations_stream: "ai:adaptations".into(),
            adaptations_max_len: 10_000,
            threshold: 3.0,
            window: Duration::from_secs(3600),
            min_feedback: 20,
            check_every: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_batch: 100,
            max_wait: Duration::from_millis(50),
        }
    }
}

const MINUTE_MS: u64 = 60_000;

fn minutes_exact(d: Duration) -> bool {
    d.as_millis().is_multiple_of(u128::from(MINUTE_MS))
}

const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The width of the default rating scale (1 to 5), kept when only one end is set.
const DEFAULT_SCALE_WIDTH: f64 = 4.0;

impl LearningOptions {
    /// `max_wait` (set or not) and an explicit `marker_ttl` bound the group's `claim_idle`
    /// (the rules in `validate`).
    pub(crate) fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        Needs {
            claim_idle_margin: self.max_wait,
            claim_idle_margin_key: is_set("max_wait").then_some("max_wait"),
            claim_idle_below: is_set("marker_ttl").then_some((self.marker_ttl, "marker_ttl")),
            ..Needs::default()
        }
    }

    /// Options left out follow the ones set and the group's limits, one derivation per
    /// rule of `validate`, in the order the rules depend on each other.
    pub(crate) fn derive(
        &mut self,
        limits: &Limits,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Vec<Derived> {
        let mut derived = Vec::new();
        let mut derive = |key: &str, from: &str| derived.push(Derived::new(key, from));
        // The scale: one end set past the default other end keeps the default's width.
        if self.rating_min.is_finite()
            && self.rating_max.is_finite()
            && self.rating_min >= self.rating_max
        {
            if is_set("rating_min") && !is_set("rating_max") {
                self.rating_max = self.rating_min + DEFAULT_SCALE_WIDTH;
                derive("rating_max", "options.rating_min");
            } else if is_set("rating_max") && !is_set("rating_min") {
                self.rating_min = self.rating_max - DEFAULT_SCALE_WIDTH;
                derive("rating_min", "options.rating_max");
            }
        }
        // The threshold: the middle of a scale that does not hold the default.
        if !is_set("threshold")
            && self.rating_min < self.rating_max
            && !(self.rating_min..=self.rating_max).contains(&self.threshold)
        {
            self.threshold = (self.rating_min + self.rating_max) / 2.0;
            let from = if is_set("rating_min") {
                "options.rating_min"
            } else {
                "options.rating_max"
            };
            derive("threshold", from);
        }
        // The window: whole minutes, within an explicit retention, covering an explicit
        // check_every.
        if !is_set("window") {
            let minute = Duration::from_millis(MINUTE_MS);
            let minutes = |d: Duration| d.as_millis() / u128::from(MINUTE_MS);
            if is_set("retention") && self.retention < self.window && self.retention >= minute {
                self.window = minute * u32::try_from(minutes(self.retention)).unwrap_or(1);
                derive("window", "options.retention");
            } else if is_set("check_every")
                && self.check_every > self.window
                && self.check_every <= MAX_WINDOW
            {
                let whole =
                    minutes(self.check_every) + u128::from(!minutes_exact(self.check_every));
                self.window = minute * u32::try_from(whole).unwrap_or(1);
                derive("window", "options.check_every");
            }
        }
        if !is_set("retention") && self.retention < self.window {
            self.retention = self.window;
            derive("retention", "options.window");
        }
        if !is_set("check_every") && self.check_every > self.window {
            self.check_every = self.window;
            derive("check_every", "options.window");
        }
        // Against the group's limits.
        if !is_set("marker_ttl") && self.marker_ttl <= limits.claim_idle {
            self.marker_ttl = limits.claim_idle.saturating_mul(2);
            derive("marker_ttl", "claim_idle");
        }
        if !is_set("max_wait")
            && limits.claim_idle > limits.handler_timeout
            && limits.claim_idle <= limits.handler_timeout + self.max_wait
        {
            self.max_wait =
                crate::duration::whole_ms((limits.claim_idle - limits.handler_timeout) / 2);
            derive("max_wait", "claim_idle");
        }
        derived
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(OptionProblem {
                key: key.to_owned(),
                message,
            })
        };
        let d = crate::duration::format;
        for (key, path) in [
            ("rating", &self.rating),
            ("thumbs", &self.thumbs),
            ("prompt", &self.prompt),
            ("response", &self.response),
            ("model", &self.model),
            ("user", &self.user),
        ] {
            if path.trim().is_empty() {
                problem(
                    key,
                    format!(
                        "is empty: name the field (or JSON path) to read, e.g. {key} = \"{key}\""
                    ),
                );
            }
        }
        if matches!(&self.prompt_id, Some(p) if p.trim().is_empty()) {
            problem(
                "prompt_id",
                "is empty: name the field holding a prompt id, or remove it to hash the prompt text".into(),
            );
        }
        if !(self.rating_min.is_finite()
            && self.rating_max.is_finite()
            && self.rating_min < self.rating_max)
        {
            problem(
                "rating_max",
                format!(
                    "the scale [{}, {}] is empty: rating_min must be below rating_max (e.g. 1 and 5)",
                    self.rating_min, self.rating_max
                ),
            );
        } else if !(self.rating_min..=self.rating_max).contains(&self.threshold) {
            problem(
                "threshold",
                format!(
                    "= {} is outside the rating scale [{}, {}]: pick a rating on the scale, e.g. 3",
                    self.threshold, self.rating_min, self.rating_max
                ),
            );
        }
        if self.marker_ttl <= limits.claim_idle {
            problem(
                "marker_ttl",
                format!(
                    "({}) must be longer than the group's claim_idle ({}), or a redelivery could find the marker gone and write a second line; e.g. marker_ttl = \"24h\"",
                    d(self.marker_ttl),
                    d(limits.claim_idle)
                ),
            );
        }
        if self.adaptations_stream.trim().is_empty() {
            problem(
                "adaptations_stream",
                "is empty: name the stream adaptation events go to, e.g. \"ai:adaptations\"".into(),
            );
        }
        if self.window < Duration::from_secs(60)
            || self.window > MAX_WINDOW
            || !self
                .window
                .as_millis()
                .is_multiple_of(u128::from(MINUTE_MS))
        {
            problem(
                "window",
                format!(
                    "({}) must be whole minutes between 1m and 24h (the window is made of per-minute buckets), e.g. \"1h\"",
                    d(self.window)
                ),
            );
        } else if self.retention < self.window {
            problem(
                "retention",
                format!(
                    "({}) is shorter than window ({}): the buckets of the window would expire before they are read",
                    d(self.retention),
                    d(self.window)
                ),
            );
        }
        if self.min_feedback == 0 {
            problem(
                "min_feedback",
                "must be at least 1: a model with no ratings has no average".into(),
            );
        }
        if self.check_every < Duration::from_millis(100) || self.check_every > self.window {
            problem(
                "check_every",
                format!(
                    "({}) must be between 100ms and window ({}), e.g. \"5s\"",
                    d(self.check_every),
                    d(self.window)
                ),
            );
        }
        if !(1..=10_000).contains(&self.max_batch) {
            problem(
                "max_batch",
                format!("= {}: must be between 1 and 10000", self.max_batch),
            );
        }
        if limits.claim_idle <= limits.handler_timeout + self.max_wait {
            problem(
                "max_wait",
                format!(
                    "({}) plus the group's handler_timeout ({}) reaches claim_idle ({}): an entry waiting for its batch could be reclaimed by another replica while it is handled; lower max_wait or handler_timeout, or raise claim_idle",
                    d(self.max_wait),
                    d(limits.handler_timeout),
                    d(limits.claim_idle)
                ),
            );
        }
        problems
    }

    /// Nothing secret in these options.
    pub(crate) fn redacted(&self) -> Self {
        self.clone()
    }
}

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

/// The default prompt id: the first 16 hex digits of the SHA-256 of the prompt text.
pub fn prompt_id(prompt: &str) -> String {
    let digest = Sha256::digest(prompt.as_bytes());
    hex::encode(&digest[..8])
}

/// The minutes (`unix_minute` numbers) of the window ending with the minute of `now_ms`.
pub fn window_range(now_ms: u64, window: Duration) -> RangeInclusive<u64> {
    let n = (window.as_millis() as u64 / MINUTE_MS).max(1);
    let last = now_ms / MINUTE_MS;
    last.saturating_sub(n - 1)..=last
}

/// Counts and sums of one model (over a window, or all time).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub count: u64,
    pub rating_sum: f64,
    pub thumbs_up: u64,
    pub thumbs_down: u64,
}

impl Totals {
    /// The average rating, `None` without ratings.
    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.rating_sum / self.count as f64)
    }
}

/// Sums per-minute buckets (the fields of `P:minute:<m>` hashes) per model.
pub fn window_totals(buckets: &[Vec<(String, String)>]) -> BTreeMap<String, Totals> {
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for (field, value) in buckets.iter().flatten() {
        let Some((kind, model)) = field.split_once(':') else {
            continue;
        };
        let t = out.entry(model.to_owned()).or_default();
        match kind {
            "count" => t.count += value.parse::<u64>().unwrap_or(0),
            "rating_sum" => t.rating_sum += value.parse::<f64>().unwrap_or(0.0),
            "thumbs_up" => t.thumbs_up += value.parse::<u64>().unwrap_or(0),
            "thumbs_down" => t.thumbs_down += value.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    out
}

/// A model's adaptation state (`P:state:<model>`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// The last judgement: at or below the threshold.
    pub low: bool,
    /// For `low`: the event of this crossing is known to be in the adaptations stream.
    pub emitted: bool,
    /// When the state last changed (unix milliseconds).
    pub at_ms: u64,
    /// The rolling average and the ratings behind it, when the state last changed.
    pub rating: f64,
    pub feedback: u64,
}

/// What one tick does for one model.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Nothing,
    /// Crossed at or below the threshold: record the state, send the event.
    Fire(ModelState),
    /// A crossing whose event is not known to be out: send it again, same content.
    Resend(ModelState),
    /// Back above the threshold: record it, so the next crossing fires.
    Recover(ModelState),
}

fn judge(
    prev: Option<&ModelState>,
    rating: f64,
    feedback: u64,
    threshold: f64,
    now_ms: u64,
) -> Step {
    let low = rating <= threshold;
    match prev {
        Some(p) if p.low && !p.emitted => Step::Resend(p.clone()),
        Some(p) if p.low == low => Step::Nothing,
        None if !low => Step::Nothing,
        _ => {
            let state = ModelState {
                low,
                emitted: false,
                at_ms: now_ms,
                rating,
                feedback,
            };
            if low {
                Step::Fire(state)
            } else {
                Step::Recover(state)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thumbs {
    Up,
    Down,
}

impl Thumbs {
    fn parse(text: &str) -> Option<Self> {
        let t = text.trim().to_lowercase();
        match t.as_str() {
            "up" | "1" | "1.0" | "true" | "yes" | "+1" | "👍" | "thumbs_up" | "thumbsup"
            | "positive" | "like" => Some(Self::Up),
            "down" | "0" | "0.0" | "-1" | "false" | "no" | "👎" | "thumbs_down" | "thumbsdown"
            | "negative" | "dislike" => Some(Self::Down),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// One feedback event, read from an entry.
#[derive(Debug, Clone, PartialEq)]
struct Feedback<'a> {
    rating: f64,
    thumbs: Option<Thumbs>,
    model: Cow<'a, str>,
    prompt: Option<Cow<'a, str>>,
    response: Option<Cow<'a, str>>,
    user: Option<Cow<'a, str>>,
    prompt_id: Option<String>,
}

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

#[derive(Debug, thiserror::Error)]
#[error("learning: {0}")]
pub struct LearningBuildError(String);

/// Creates `dir` and a file in it (removed again).
fn probe(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(".probe-{}", std::process::id()));
    File::create(&path)?;
    std::fs::remove_file(&path)
}

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

fn non_empty(v: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    v.filter(|s| !s.trim().is_empty())
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
            Some(Arc::new(Dataset {
                dir,
                current: Mutex::new(None),
            }))
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

    fn feedback<'e>(&self, entry: &'e Entry) -> Result<Feedback<'e>, HandlerError> {
        let o = &self.options;
        let thumbs = match non_empty(entry.get(&o.thumbs)) {
            None => None,
            Some(text) => Some(Thumbs::parse(&text).ok_or_else(|| {
                HandlerError::permanent(format!(
                    "{} = `{}` is neither a thumbs up nor down (use up/down, 1/0, true/false)",
                    o.thumbs,
                    clip(&text)
                ))
            })?),
        };
        let rating = match non_empty(entry.get(&o.rating)) {
            Some(text) => {
                let r: f64 = text
                    .trim()
                    .parse()
                    .ok()
                    .filter(|r: &f64| r.is_finite())
                    .ok_or_else(|| {
                        HandlerError::permanent(format!(
                            "{} = `{}` is not a number",
                            o.rating,
                            clip(&text)
                        ))
                    })?;
                if !(o.rating_min..=o.rating_max).contains(&r) {
                    return Err(HandlerError::permanent(format!(
                        "{} = {r} is outside the rating scale [{}, {}]",
                        o.rating, o.rating_min, o.rating_max
                    )));
                }
                r
            }
            None => match thumbs {
                Some(Thumbs::Up) => o.rating_max,
                Some(Thumbs::Down) => o.rating_min,
                None => {
                    return Err(HandlerError::drop_entry(format!(
                        "no rating (`{}`) and no thumbs (`{}`): nothing to learn from",
                        o.rating, o.thumbs
                    )));
                }
            },
        };
        let prompt = non_empty(entry.get(&o.prompt));
        let prompt_id = o
            .prompt_id
            .as_deref()
            .and_then(|path| non_empty(entry.get(path)))
            .map(Cow::into_owned)
            .or_else(|| prompt.as_deref().map(prompt_id));
        Ok(Feedback {
            rating,
            thumbs,
            model: non_empty(entry.get(&o.model)).unwrap_or(Cow::Borrowed("unknown")),
            prompt,
            response: non_empty(entry.get(&o.response)),
            user: non_empty(entry.get(&o.user)),
            prompt_id,
        })
    }

    /// The aggregate writes of one feedback, applied with the entry's acknowledgement.
    fn effects(&self, entry: &Entry, f: &Feedback<'_>) -> Effects {
        let ttl = self.options.retention;
        let model = f.model.as_ref();
        let mut out = Vec::with_capacity(18);
        let totals = |key: String, out: &mut Effects| {
            out.push(Effect::HashIncr {
                key: key.clone(),
                field: "count".into(),
                by: 1,
            });
            out.push(Effect::HashIncrFloat {
                key: key.clone(),
                field: "rating_sum".into(),
                by: f.rating,
            });
            if let Some(t) = f.thumbs {
                out.push(Effect::HashIncr {
                    key: key.clone(),
                    field: format!("thumbs_{}", t.name()),
                    by: 1,
                });
            }
            out.push(Effect::Expire { key, ttl });
        };
        totals(self.keys.model(model), &mut out);
        if let Some(id) = &f.prompt_id {
            totals(self.keys.prompt(id), &mut out);
        }
        let models = self.keys.models();
        out.push(Effect::HashIncr {
            key: models.clone(),
            field: model.to_owned(),
            by: 1,
        });
        out.push(Effect::Expire { key: models, ttl });
        let bucket = self.keys.minute(entry.idempotency_id().ms / MINUTE_MS);
        out.push(Effect::HashIncr {
            key: bucket.clone(),
            field: format!("count:{model}"),
            by: 1,
        });
        out.push(Effect::HashIncrFloat {
            key: bucket.clone(),
            field: format!("rating_sum:{model}"),
            by: f.rating,
        });
        if let Some(t) = f.thumbs {
            out.push(Effect::HashIncr {
                key: bucket.clone(),
                field: format!("thumbs_{}:{model}", t.name()),
                by: 1,
            });
        }
        out.push(Effect::Expire { key: bucket, ttl });
        out
    }

    fn line(&self, entry: &Entry, f: &Feedback<'_>) -> Result<Vec<u8>, HandlerError> {
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

    /// Writes the lines not already written, fsyncs, then sets their markers. Entries whose
    /// line could not be written (or checked) fail retryably.
    async fn write_lines(
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

/// A number as events show it: at most 3 decimals, no trailing zeros.
fn number(x: f64) -> String {
    let text = format!("{x:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_owned()
}

fn clip(text: &str) -> String {
    text.chars().take(40).collect()
}

/// The UTC day (`YYYY-MM-DD`) of an entry id.
fn day(id: EntryId) -> String {
    let mut text = humantime::format_rfc3339_seconds(id.time()).to_string();
    text.truncate(10);
    text
}

/// A group name as one safe path component: bytes outside `[A-Za-z0-9_.-]` (and a leading
/// dot) percent-encoded.
fn path_component(name: &str) -> String {
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
struct Dataset {
    dir: PathBuf,
    /// The file most recently appended to, kept open.
    current: Mutex<Option<OpenFile>>,
}

struct OpenFile {
    day: String,
    file: File,
    /// The file does not end with a newline (a torn write): start with one.
    needs_newline: bool,
}

impl Dataset {
    fn path(&self, day: &str) -> PathBuf {
        self.dir.join(format!("feedback-{day}.jsonl"))
    }

    fn open(&self, day: &str) -> io::Result<OpenFile> {
        let path = self.path(day);
        let existed = path.exists();
        if !existed {
            std::fs::create_dir_all(&self.dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if !existed {
            // The new name must survive a power loss as well as the lines in it.
            File::open(&self.dir)?.sync_all()?;
        }
        let needs_newline = match file.metadata()?.len() {
            0 => false,
            len => {
                let mut reader = File::open(&path)?;
                reader.seek(SeekFrom::Start(len - 1))?;
                let mut last = [0u8; 1];
                reader.read_exact(&mut last)?;
                last[0] != b'\n'
            }
        };
        Ok(OpenFile {
            day: day.to_owned(),
            file,
            needs_newline,
        })
    }

    /// Appends `lines` (whole lines) to the day's file in one write, then fsyncs.
    fn append(&self, day: &str, lines: &[u8]) -> io::Result<()> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|c| c.day != day) {
            *current = None;
            *current = Some(self.open(day)?);
        }
        let Some(open) = current.as_mut() else {
            return Err(io::Error::other("no open dataset file"));
        };
        let result = if open.needs_newline {
            let mut buf = Vec::with_capacity(lines.len() + 1);
            buf.push(b'\n');
            buf.extend_from_slice(lines);
            open.file.write_all(&buf)
        } else {
            open.file.write_all(lines)
        }
        .and_then(|()| open.file.sync_data());
        match result {
            Ok(()) => {
                open.needs_newline = false;
                Ok(())
            }
            Err(e) => {
                // Reopen next time, which looks at how the file ends.
                *current = None;
                Err(e)
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PayloadFormat, StoreError, StoreFuture};

    fn limits() -> Limits {
        Limits {
            handler_timeout: Duration::from_secs(30),
            claim_idle: Duration::from_secs(120),
        }
    }

    /// A store that keeps strings and records applied effects.
    #[derive(Default)]
    struct MemoryStore {
        values: Mutex<HashMap<String, String>>,
        applied: Mutex<Vec<Effect>>,
        hashes: Mutex<HashMap<String, Vec<(String, String)>>>,
    }

    impl Store for MemoryStore {
        fn apply(&self, effects: Vec<Effect>) -> StoreFuture<'_, ()> {
            self.applied.lock().unwrap().extend(effects);
            Box::pin(async { Ok(()) })
        }
        fn hashes(&self, keys: Vec<String>) -> StoreFuture<'_, Vec<Vec<(String, String)>>> {
            let h = self.hashes.lock().unwrap();
            let out = keys
                .iter()
                .map(|k| h.get(k).cloned().unwrap_or_default())
                .collect();
            Box::pin(async move { Ok(out) })
        }
        fn get(&self, key: String) -> StoreFuture<'_, Option<String>> {
            let v = self.values.lock().unwrap().get(&key).cloned();
            Box::pin(async move { Ok(v) })
        }
        fn set(&self, key: String, value: String, _ttl: Option<Duration>) -> StoreFuture<'_, ()> {
            self.values.lock().unwrap().insert(key, value);
            Box::pin(async { Ok(()) })
        }
        fn mark(&self, key: String, _ttl: Duration) -> StoreFuture<'_, bool> {
            let mut v = self.values.lock().unwrap();
            let new = !v.contains_key(&key);
            v.entry(key).or_insert_with(|| "1".into());
            Box::pin(async move { Ok(new) })
        }
        fn lag(&self, _stream: String, _group: String) -> StoreFuture<'_, Option<u64>> {
            Box::pin(async { Err(StoreError("not here".into())) })
        }
        fn consumers(
            &self,
            _stream: String,
            _group: String,
        ) -> StoreFuture<'_, Option<Vec<(String, u64)>>> {
            Box::pin(async { Err(StoreError("not here".into())) })
        }
    }

    fn entry(id: EntryId, delivery_count: u64, pairs: &[(&str, &str)]) -> Entry {
        Entry::for_test(
            "user:feedback",
            "learning",
            id,
            delivery_count,
            pairs,
            &PayloadFormat::Fields,
        )
    }

    fn handler(dir: &Path, store: Arc<MemoryStore>) -> Learning {
        let options = LearningOptions {
            dataset_dir: dir.to_string_lossy().into_owned(),
            ..Default::default()
        };
        Learning::new(&options, "user:feedback", "learning", store).unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn defaults_are_valid_and_problems_name_their_key() {
        assert!(LearningOptions::default().validate(&limits()).is_empty());
        let bad = LearningOptions {
            rating: "".into(),
            threshold: 9.0,
            window: Duration::from_secs(90),
            min_feedback: 0,
            max_wait: Duration::from_secs(100),
            marker_ttl: Duration::from_secs(60),
            ..Default::default()
        };
        let keys: Vec<String> = bad.validate(&limits()).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "rating",
                "threshold",
                "marker_ttl",
                "window",
                "min_feedback",
                "max_wait"
            ]
        );
        let short = LearningOptions {
            retention: Duration::from_secs(60),
            ..Default::default()
        };
        assert_eq!(short.validate(&limits())[0].key, "retention");
    }

    #[test]
    fn options_parse_from_toml_with_defaults() {
        let o: LearningOptions = toml_like(r#"{"threshold": 2.5, "window": "10m"}"#);
        assert_eq!(o.threshold, 2.5);
        assert_eq!(o.window, Duration::from_secs(600));
        assert_eq!(o.rating, "rating");
        assert_eq!(o.adaptations_stream, "ai:adaptations");
        assert!(
            serde_json::from_str::<LearningOptions>(r#"{"ratings": "x"}"#).is_err(),
            "unknown keys are errors"
        );
    }

    fn toml_like(json: &str) -> LearningOptions {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn thumbs_and_ratings_are_read_and_checked() {
        let store = Arc::new(MemoryStore::default());
        let h = handler(Path::new(""), store);
        let id = EntryId::new(1_700_000_000_000, 0);
        let f = |pairs: &[(&str, &str)]| {
            let e = entry(id, 1, pairs);
            h.feedback(&e)
                .map(|f| (f.rating, f.thumbs, f.model.into_owned()))
        };
        assert_eq!(
            f(&[("rating", "4"), ("model", "m")]),
            Ok((4.0, None, "m".into()))
        );
        assert_eq!(
            f(&[("thumbs", "UP")]),
            Ok((5.0, Some(Thumbs::Up), "unknown".into()))
        );
        assert_eq!(
            f(&[("thumbs", "0")]),
            Ok((1.0, Some(Thumbs::Down), "unknown".into()))
        );
        assert_eq!(
            f(&[("thumbs", "down"), ("rating", "2")]),
            Ok((2.0, Some(Thumbs::Down), "unknown".into()))
        );
        assert!(matches!(f(&[("model", "m")]), Err(HandlerError::Drop(_))));
        assert!(matches!(f(&[("rating", "")]), Err(HandlerError::Drop(_))));
        assert!(matches!(
            f(&[("rating", "six")]),
            Err(HandlerError::Permanent(_))
        ));
        assert!(matches!(
            f(&[("rating", "6")]),
            Err(HandlerError::Permanent(_))
        ));
        assert!(matches!(
            f(&[("thumbs", "meh")]),
            Err(HandlerError::Permanent(_))
        ));
    }

    #[test]
    fn json_payloads_use_paths() {
        let store = Arc::new(MemoryStore::default());
        let options = LearningOptions {
            rating: "feedback.score".into(),
            model: "data.model".into(),
            prompt_id: Some("data.prompt_id".into()),
            dataset_dir: String::new(),
            ..Default::default()
        };
        let h = Learning::new(&options, "user:feedback", "learning", store).unwrap();
        let mut e = entry(
            EntryId::new(1, 0),
            1,
            &[(
                "event",
                r#"{"feedback":{"score":3},"data":{"model":"gpt-4o","prompt_id":"p-7"},"prompt":"hi"}"#,
            )],
        );
        e.decode(&PayloadFormat::Json("event".into())).unwrap();
        let f = h.feedback(&e).unwrap();
        assert_eq!(f.rating, 3.0);
        assert_eq!(f.model, "gpt-4o");
        assert_eq!(f.prompt_id.as_deref(), Some("p-7"));
        assert_eq!(f.prompt.as_deref(), Some("hi"));
    }

    #[test]
    fn effects_cover_model_prompt_index_and_minute() {
        let store = Arc::new(MemoryStore::default());
        let h = handler(Path::new(""), store);
        let e = entry(
            EntryId::new(120_000, 3),
            1,
            &[
                ("rating", "4.5"),
                ("thumbs", "up"),
                ("model", "m:1"),
                ("prompt", "p"),
            ],
        );
        let f = h.feedback(&e).unwrap();
        let effects = h.effects(&e, &f);
        let pid = prompt_id("p");
        let k = Keys::new("user:feedback", "learning");
        let incr = |key: String, field: &str| Effect::HashIncr {
            key,
            field: field.into(),
            by: 1,
        };
        assert!(effects.contains(&incr(k.model("m:1"), "count")));
        assert!(effects.contains(&incr(k.model("m:1"), "thumbs_up")));
        assert!(effects.contains(&incr(k.prompt(&pid), "count")));
        assert!(effects.contains(&incr(k.models(), "m:1")));
        assert!(effects.contains(&incr(k.minute(2), "count:m:1")));
        assert!(effects.contains(&Effect::HashIncrFloat {
            key: k.minute(2),
            field: "rating_sum:m:1".into(),
            by: 4.5
        }));
        assert_eq!(k.model("m"), "{user:feedback}:learning:learning:model:m");
        // Every key is in the stream's hash slot.
        assert!(
            effects
                .iter()
                .all(|e| e.key().starts_with("{user:feedback}:"))
        );
        // The window sums what the minute buckets hold, models with colons included.
        let bucket = vec![
            ("count:m:1".to_string(), "2".to_string()),
            ("rating_sum:m:1".to_string(), "7.5".to_string()),
            ("thumbs_down:m:1".to_string(), "1".to_string()),
        ];
        let totals = window_totals(&[bucket.clone(), bucket]);
        assert_eq!(
            totals["m:1"],
            Totals {
                count: 4,
                rating_sum: 15.0,
                thumbs_up: 0,
                thumbs_down: 2
            }
        );
        assert_eq!(totals["m:1"].average(), Some(3.75));
    }

    #[test]
    fn windows_are_whole_minutes_ending_now() {
        assert_eq!(
            window_range(10 * MINUTE_MS + 5, Duration::from_secs(180)),
            8..=10
        );
        assert_eq!(window_range(5, Duration::from_secs(3600)), 0..=0);
    }

    #[test]
    fn crossings_fire_once_and_again_after_recovery() {
        let t = 3.0;
        assert_eq!(judge(None, 4.0, 30, t, 1), Step::Nothing);
        let Step::Fire(low) = judge(None, 2.0, 30, t, 1) else {
            panic!("a first judgement at or below the threshold fires")
        };
        assert!(low.low && !low.emitted);
        assert_eq!(low.rating, 2.0);
        // Not known to be out: sent again with the same content.
        assert_eq!(judge(Some(&low), 1.0, 40, t, 2), Step::Resend(low.clone()));
        let out = ModelState {
            emitted: true,
            ..low
        };
        assert_eq!(
            judge(Some(&out), 3.0, 40, t, 2),
            Step::Nothing,
            "at = still low"
        );
        let Step::Recover(ok) = judge(Some(&out), 3.1, 40, t, 3) else {
            panic!("recovers above the threshold")
        };
        assert_eq!(judge(Some(&ok), 3.5, 40, t, 4), Step::Nothing);
        assert!(matches!(judge(Some(&ok), 2.9, 40, t, 5), Step::Fire(_)));
    }

    #[test]
    fn numbers_and_days_and_paths() {
        assert_eq!(number(2.0), "2");
        assert_eq!(number(2.33333), "2.333");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(day(EntryId::new(1_700_000_000_000, 0)), "2023-11-14");
        assert_eq!(path_component("learning"), "learning");
        assert_eq!(path_component("../x/y"), "%2E.%2Fx%2Fy");
        assert_eq!(prompt_id("hello").len(), 16);
        assert_ne!(prompt_id("hello"), prompt_id("hello!"));
    }

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
        let dir = tempfile_dir();
        let store = Arc::new(MemoryStore::default());
        let h = handler(&dir, Arc::clone(&store));
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
        let got = lines(&dir);
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
        assert!(
            store
                .values
                .lock()
                .unwrap()
                .contains_key(&h.keys.written(id))
        );

        // A redelivery with the marker: no second line.
        let again = entry(id, 2, &[("rating", "2"), ("model", "m")]);
        assert!(rt.block_on(h.handle(&again)).is_ok());
        assert_eq!(lines(&dir).len(), 1);

        // A redelivery after a crash between write and marker: found in the file.
        store.values.lock().unwrap().clear();
        assert!(rt.block_on(h.handle(&again)).is_ok());
        assert_eq!(lines(&dir).len(), 1);
        assert!(
            store
                .values
                .lock()
                .unwrap()
                .contains_key(&h.keys.written(id)),
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_dataset_dir_fails_at_startup() {
        let dir = tempfile_dir();
        let file = dir.join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let options = LearningOptions {
            dataset_dir: file.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let store = Arc::new(MemoryStore::default());
        let e = Learning::new(&options, "s", "g", store).unwrap_err();
        assert!(
            e.to_string().contains("dataset_dir: cannot write to"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tick_sends_one_event_per_crossing() {
        let store = Arc::new(MemoryStore::default());
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
        store.hashes.lock().unwrap().insert(
            h.keys.minute(now / MINUTE_MS),
            vec![
                ("count:bad".into(), "4".into()),
                ("rating_sum:bad".into(), "8".into()),
                ("count:good".into(), "4".into()),
                ("rating_sum:good".into(), "18".into()),
                ("count:few".into(), "2".into()),
                ("rating_sum:few".into(), "2".into()),
            ],
        );
        let rt = rt();
        rt.block_on(h.tick()).unwrap();
        rt.block_on(h.tick()).unwrap();
        let applied = store.applied.lock().unwrap().clone();
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
            serde_json::from_str(&store.values.lock().unwrap()[&h.keys.state("bad")]).unwrap();
        assert!(state.low && state.emitted);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "streamworker-learning-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
