//! The web console (`http.console = true`): one page at `/` on the HTTP listener of every
//! replica, showing every group (rate, lag, pending, retries, dead letters, consumers,
//! circuit, paused), an hour of rate and lag, and each group's pending entries and dead
//! letters; with a token (`http.console_token_file`) it replays, purges, pauses and
//! resumes, through the same `admin` functions as the CLI.
//!
//! Entry fields and error texts are attacker-controlled, so the page is built for that:
//! maud escapes every value, the Content-Security-Policy allows only the page's own script
//! and style files (no inline script, style or event handler runs even if markup slipped
//! through), and actions are POSTs that need the token in an `Authorization` header, which
//! only the console's own script sends: a cross-site form or link cannot set that header,
//! and a cross-site `fetch` that does is a CORS request the listener never allows.
//! Requests a browser marks cross-site (`Sec-Fetch-Site`, `Origin`) are refused first.

mod history;
mod page;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::admin;
use crate::client::{Client, ClientError};
use crate::config::{Config, GroupConfig};
use crate::inspect::streams_of;

pub use history::{History, KEEP, SAMPLE_EVERY, Sample};

const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// Every console response carries these: the page may load only its own files, may not be
/// framed, and sends no referrer.
const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'";

/// At most this many ids in one replay or purge.
const MAX_IDS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(
        "cannot read http.console_token_file {path:?}: {source}; create it with a long random token (e.g. `openssl rand -hex 32`), or leave the key out for a read-only console"
    )]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "http.console_token_file {path:?} is empty; write a long random token in it, or leave the key out for a read-only console"
    )]
    EmptyToken { path: PathBuf },
}

/// The console's shared state; cheap to clone.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    token: Option<Token>,
    /// Connected on first use, on the listener's runtime (its connections' tasks live there).
    client: OnceCell<Client>,
    history: Mutex<History>,
}

/// The bearer token actions need, and the id that names it in logs.
struct Token {
    digest: [u8; 32],
    id: String,
}

impl Token {
    fn new(secret: &str) -> Self {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        Self {
            digest,
            id: token_id(secret),
        }
    }

    /// Compares digests, so the time taken says nothing about how much of a guess was right.
    fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// What names a token in the logs: the first 8 hex digits of its SHA-256, never the token.
pub fn token_id(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Console {
    /// Reads the token file (trimmed; a trailing newline is not part of the token).
    pub fn new(config: &Config) -> Result<Self, ConsoleError> {
        let token = match &config.http.console_token_file {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConsoleError::TokenFile {
                        path: path.clone(),
                        source,
                    })?;
                let secret = text.trim();
                if secret.is_empty() {
                    return Err(ConsoleError::EmptyToken { path: path.clone() });
                }
                Some(Token::new(secret))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                token,
                client: OnceCell::new(),
                history: Mutex::new(History::default()),
            }),
        })
    }

    /// Whether actions are on (a token is configured).
    pub fn actions(&self) -> bool {
        self.inner.token.is_some()
    }

    async fn client(&self) -> Result<&Client, ClientError> {
        self.inner
            .client
            .get_or_try_init(|| Client::connect(&self.inner.config.redis))
            .await
    }

    /// Samples every configured group every [`SAMPLE_EVERY`], forever; run it on the
    /// listener's runtime. A failed sample is skipped (the chart shows a gap in time).
    pub async fn sample_forever(self) {
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = self.sample().await {
                tracing::debug!(error = %e, "the console could not sample the groups");
            }
        }
    }

    async fn sample(&self) -> Result<(), ClientError> {
        let client = self.client().await?;
        let config = &self.inner.config;
        for stream in streams_of(config) {
            let infos = client.groups(&stream).await?;
            let at_ms = now_ms();
            let mut history = self.inner.history.lock().expect("history lock");
            for info in infos {
                if config
                    .groups
                    .values()
                    .any(|g| g.name == info.name && g.stream == stream)
                {
                    history.record(&stream, &info.name, at_ms, info.lag, info.entries_read);
                }
            }
        }
        Ok(())
    }

    /// The routes under the listener: `/`, `/console/live` (the part of the page the
    /// script refreshes), the script and style, and the actions.
    pub fn routes<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        Router::new()
            .route("/", get(index))
            .route("/console/live", get(live))
            .route("/console/console.js", get(script))
            .route("/console/console.css", get(style))
            .route("/console/groups/{group}/{action}", post(action))
            .with_state(self)
    }

    fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.inner.config.groups.values().find(|g| g.name == name)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A response with the console's security headers.
fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn text(status: StatusCode, body: String) -> Response {
    respond(status, "text/plain; charset=utf-8", body + "\n")
}

async fn index(State(console): State<Console>) -> Response {
    let snapshot = page::Snapshot::gather(&console).await;
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        page::full(&console, &snapshot),
    )
}

async fn live(State(console): State<Console>) -> Response {
    let snapshot = page::Snapshot::gather(&console).await;
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        page::live(&console, &snapshot),
    )
}

async fn script() -> Response {
    respond(
        StatusCode::OK,
        "text/javascript; charset=utf-8",
        SCRIPT.to_owned(),
    )
}

async fn style() -> Response {
    respond(StatusCode::OK, "text/css; charset=utf-8", STYLE.to_owned())
}

/// Why a request that a browser made on behalf of another site is refused, if it is.
/// `Sec-Fetch-Site` (sent by current browsers) must say `same-origin` (or `none`: typed by
/// the user); an `Origin`, when sent, must name the host the request went to.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return Some(format!("Sec-Fetch-Site is {site:?}"));
    }
    if let Some(origin) = get("origin") {
        let host = get("host").unwrap_or_default();
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin_host != host {
            return Some(format!("Origin {origin:?} is not this console ({host:?})"));
        }
    }
    None
}

fn valid_id(id: &str) -> bool {
    match id.split_once('-') {
        Some((ms, seq)) => {
            !ms.is_empty()
                && !seq.is_empty()
                && ms.bytes().all(|b| b.is_ascii_digit())
                && seq.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ActionBody {
    ids: Vec<String>,
}

async fn action(
    State(console): State<Console>,
    Path((group, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = &console.inner.token else {
        return text(
            StatusCode::UNAUTHORIZED,
            "the console is read-only: set http.console_token_file to allow actions".into(),
        );
    };
    if let Some(why) = cross_site(&headers) {
        tracing::warn!(action, group, reason = %why, "the console refused a cross-site request");
        return text(
            StatusCode::FORBIDDEN,
            format!("refused: a cross-site request ({why})"),
        );
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !given.is_some_and(|g| token.matches(g)) {
        tracing::warn!(
            action,
            group,
            "the console refused an action without the right token"
        );
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "refused: enter the console token (the contents of http.console_token_file)".into(),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let Some(config) = console.group(&group) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no group {group:?} in this replica's configuration"),
        );
    };
    let ids = if body.is_empty() {
        Vec::new()
    } else {
        match serde_json::from_slice::<ActionBody>(&body) {
            Ok(b) => b.ids,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be {{\"ids\": [\"<dead letter id>\", …]}}: {e}"),
                );
            }
        }
    };
    if matches!(action.as_str(), "replay" | "purge") {
        if ids.is_empty() || ids.len() > MAX_IDS {
            return text(
                StatusCode::BAD_REQUEST,
                format!("{action} needs between 1 and {MAX_IDS} dead letter ids"),
            );
        }
        if let Some(bad) = ids.iter().find(|id| !valid_id(id)) {
            return text(
                StatusCode::BAD_REQUEST,
                format!("{bad:?} is not a stream id (like 1700000000000-0)"),
            );
        }
    }
    let client = match console.client().await {
        Ok(c) => c,
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot use Redis: {e}"),
            );
        }
    };
    let claim_interval = console.inner.config.worker.claim_interval;
    let outcome: Result<String, ClientError> = match action.as_str() {
        "replay" => {
            let selection = admin::dlq::Selection::Ids(ids.clone());
            let mut lines = Vec::new();
            admin::dlq::replay(
                client,
                config,
                &selection,
                &admin::dlq::ReplayOptions::default(),
                &mut lines,
            )
            .await
            .map(|report| {
                let mut out = format!(
                    "replayed {} dead letter{} to {}",
                    report.replayed,
                    if report.replayed == 1 { "" } else { "s" },
                    report.stream
                );
                if !report.missing.is_empty() {
                    out.push_str(&format!(
                        "; not there (already replayed or purged): {}",
                        report.missing.join(", ")
                    ));
                }
                out
            })
        }
        "purge" => {
            let selection = admin::dlq::Selection::Ids(ids.clone());
            admin::dlq::purge(client, config, &selection)
                .await
                .map(|n| {
                    format!(
                        "purged {n} dead letter{} from {}",
                        if n == 1 { "" } else { "s" },
                        config.dead_letter_stream()
                    )
                })
        }
        "pause" | "resume" => admin::pause::run(client, config, claim_interval, action == "pause")
            .await
            .map(|o| o.render().trim_end().to_owned()),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no action {action:?}; the console knows replay, purge, pause and resume"),
            );
        }
    };
    match outcome {
        Ok(summary) => {
            tracing::info!(
                token_id = %token.id,
                action,
                group,
                stream = %config.stream,
                ids = ?ids,
                outcome = %summary,
                "console action"
            );
            text(StatusCode::OK, summary)
        }
        Err(e) => {
            tracing::warn!(
                token_id = %token.id,
                action,
                group,
                ids = ?ids,
                error = %e,
                "console action failed"
            );
            text(StatusCode::BAD_GATEWAY, format!("{action} failed: {e}"))
        }
    }
}

/// How long ago `ms` (Unix milliseconds) was, as "1m 30s".
fn ago(ms: u64) -> String {
    admin::human(Duration::from_millis(now_ms().saturating_sub(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_id_is_eight_hex_digits_of_sha256_never_the_token() {
        // sha256("secret") = 2bb80d53…
        assert_eq!(token_id("secret"), "2bb80d53");
        let t = Token::new("secret");
        assert!(t.matches("secret"));
        assert!(!t.matches("secret "));
        assert!(!t.matches(""));
    }

    #[test]
    fn cross_site_requests_are_named() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:9464".parse().unwrap());
        assert_eq!(cross_site(&h), None, "curl sends neither header");
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        h.insert("origin", "http://127.0.0.1:9464".parse().unwrap());
        assert_eq!(cross_site(&h), None);
        h.insert("origin", "https://evil.example".parse().unwrap());
        assert!(cross_site(&h).unwrap().contains("evil.example"));
        h.insert("origin", "http://127.0.0.1:9464".parse().unwrap());
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(cross_site(&h).unwrap().contains("cross-site"));
    }

    #[test]
    fn ids_must_be_stream_ids() {
        assert!(valid_id("1700000000000-0"));
        assert!(!valid_id("-"));
        assert!(!valid_id("+"));
        assert!(!valid_id("1-"));
        assert!(!valid_id("(1-0"));
        assert!(!valid_id("1700000000000"));
    }
}
