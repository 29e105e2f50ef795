//! `handler = "webhook"`: the language-neutral way to plug in business logic.
//!
//! One POST per entry with the JSON body of DESIGN §2, an `Idempotency-Key`, an optional
//! HMAC signature and the consumer span's `traceparent`. A 2xx reply acknowledges the entry;
//! 429, 5xx, a timeout or a failed connection is retryable; any other status is permanent.
//! A 2xx with an `X-Streamworker-Drop: <reason>` header drops the entry.

use std::collections::BTreeMap;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use sha2::Sha256;

use crate::redact::{REDACTED, redact_text, redact_url};
use crate::{
    Derived, Effects, Entry, Handler, HandlerError, Limits, Needs, OptionProblem, ResultExt,
};

/// A 2xx reply carrying this header drops the entry (acknowledged and counted as
/// `dropped`, no dead letter): the endpoint's way to say "not mine", "duplicate" or "stale".
pub const DROP_HEADER: &str = "x-streamworker-drop";

/// `[groups.<name>.options]` for `handler = "webhook"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookOptions {
    /// Where each entry is POSTed, `http://` or `https://`.
    #[serde(default)]
    pub url: String,
    /// The whole request, connect to last byte of the reply. At most `handler_timeout`.
    #[serde(with = "crate::duration", default = "default_timeout")]
    pub timeout: Duration,
    /// Signs each request with HMAC-SHA256 (`X-Streamworker-Signature`) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Extra request headers, e.g. `{ Authorization = "Bearer …" }`. Values are redacted
    /// when the configuration is printed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl WebhookOptions {
    /// An explicit `timeout` asks for a `handler_timeout` at least as long (the rule in
    /// `validate`).
    pub(crate) fn needs(&self, is_set: &dyn Fn(&str) -> bool) -> Needs {
        Needs {
            handler_timeout_at_least: is_set("timeout").then_some((self.timeout, "timeout")),
            ..Needs::default()
        }
    }

    /// A `timeout` left out follows a shorter `handler_timeout` (the rule in `validate`):
    /// `handler_timeout = "1s"` alone makes the request's timeout 1s, not an error.
    pub(crate) fn derive(
        &mut self,
        limits: &Limits,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Vec<Derived> {
        if !is_set("timeout") && self.timeout > limits.handler_timeout {
            self.timeout = limits.handler_timeout;
            return vec![Derived::new("timeout", "handler_timeout")];
        }
        Vec::new()
    }

    pub(crate) fn validate(&self, limits: &Limits) -> Vec<OptionProblem> {
        let handler_timeout = limits.handler_timeout;
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(OptionProblem {
                key: key.to_owned(),
                message,
            })
        };
        if self.url.is_empty() {
            problem(
                "url",
                "is missing: set the endpoint each entry is POSTed to, e.g. url = \"http://127.0.0.1:8080/events\"".into(),
            );
        } else {
            match reqwest::Url::parse(&self.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                Ok(u) => problem(
                    "url",
                    format!(
                        "`{}` is not an http(s) URL (scheme `{}`)",
                        redact_url(&self.url),
                        u.scheme()
                    ),
                ),
                Err(e) => problem(
                    "url",
                    format!("`{}` is not a URL: {e}", redact_url(&self.url)),
                ),
            }
        }
        if self.timeout.is_zero() {
            problem("timeout", "must be greater than zero".into());
        } else if self.timeout > handler_timeout {
            problem(
                "timeout",
                format!(
                    "({}) exceeds the group's handler_timeout ({}): the request would be cut off before its own timeout; lower it or raise handler_timeout",
                    crate::duration::format(self.timeout),
                    crate::duration::format(handler_timeout)
                ),
            );
        }
        if matches!(&self.secret, Some(s) if s.is_empty()) {
            problem(
                "secret",
                "is empty: remove it to send unsigned requests, or set a real secret".into(),
            );
        }
        for (name, value) in &self.headers {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problem(
                    &format!("headers.{name}"),
                    "is not a valid HTTP header name".into(),
                );
            } else if HeaderValue::from_str(value).is_err() {
                problem(
                    &format!("headers.{name}"),
                    "has a value that is not a valid HTTP header value".into(),
                );
            }
        }
        problems
    }

    pub(crate) fn redacted(&self) -> Self {
        Self {
            url: redact_url(&self.url),
            timeout: self.timeout,
            secret: self.secret.as_ref().map(|_| REDACTED.to_owned()),
            headers: self
                .headers
                .keys()
                .map(|k| (k.clone(), REDACTED.to_owned()))
                .collect(),
        }
    }
}

/// The webhook handler for one group: a pooled HTTP client and the request template.
#[derive(Debug)]
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    /// `url` for messages: its password and secret query parameters hidden (every error
    /// reaches logs, spans and dead letters).
    display_url: String,
    timeout: Duration,
    secret: Option<Vec<u8>>,
}

/// reqwest is built without a default TLS provider (to keep aws-lc-rs out of the build);
/// install ring's once per process.
pub fn install_tls_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[derive(Debug, thiserror::Error)]
#[error("webhook: {0}")]
pub struct WebhookBuildError(String);

impl Webhook {
    /// Builds the client. `concurrency` sizes the connection pool, so that every handler call
    /// in flight can keep its connection alive.
    pub fn new(options: &WebhookOptions, concurrency: usize) -> Result<Self, WebhookBuildError> {
        install_tls_provider();
        let url = reqwest::Url::parse(&options.url)
            .map_err(|e| WebhookBuildError(format!("url {}: {e}", redact_url(&options.url))))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &options.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| WebhookBuildError(format!("headers.{name}: {e}")))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|e| WebhookBuildError(format!("headers.{name}: {e}")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A 301/302 would turn the POST into a GET; say so instead of following it.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("streamworker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookBuildError(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            display_url: redact_url(url.as_str()),
            url,
            timeout: options.timeout,
            secret: options.secret.as_ref().map(|s| s.as_bytes().to_vec()),
        })
    }

    /// The signature header value for a body sent at `timestamp` (unix seconds):
    /// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
    pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// The request body: `{"stream","group","id","delivery_count","fields":{…}}`, fields in
/// stream order.
struct Body<'a>(&'a Entry);

impl Serialize for Body<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Fields<'a>(&'a [(Vec<u8>, Vec<u8>)]);
        impl Serialize for Fields<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(self.0.len()))?;
                for (name, value) in self.0 {
                    map.serialize_entry(
                        &String::from_utf8_lossy(name),
                        &String::from_utf8_lossy(value),
                    )?;
                }
                map.end()
            }
        }
        let e = self.0;
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("stream", e.stream())?;
        map.serialize_entry("group", e.group())?;
        map.serialize_entry("id", &e.id)?;
        map.serialize_entry("delivery_count", &e.delivery_count)?;
        map.serialize_entry("fields", &Fields(&e.fields))?;
        map.end()
    }
}

/// Header values must be visible ASCII; percent-encode anything else (stream names may be
/// any bytes).
fn header_value(text: &str) -> HeaderValue {
    let plain = text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    (if plain {
        HeaderValue::from_str(text).ok()
    } else {
        None
    })
    .unwrap_or_else(|| {
        let mut out = String::with_capacity(text.len() * 3);
        for b in text.bytes() {
            if b.is_ascii_graphic() || b == b' ' {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        HeaderValue::from_str(&out).expect("percent-encoded text is a valid header")
    })
}

impl Handler for Webhook {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        let body = serde_json::to_vec(&Body(entry)).permanent()?;
        let key = format!("{}/{}", entry.stream(), entry.idempotency_id());
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", header_value(&key));
        if let Some(traceparent) = &entry.traceparent {
            request = request.header("traceparent", header_value(traceparent));
        }
        if let Some(secret) = &self.secret {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            request = request
                .header("x-streamworker-timestamp", timestamp)
                .header(
                    "x-streamworker-signature",
                    Self::signature(secret, timestamp, &body),
                );
        }
        let response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(HandlerError::retry(format!(
                    "webhook {} timed out after {}",
                    self.display_url,
                    crate::duration::format(self.timeout)
                )));
            }
            Err(e) => {
                return Err(HandlerError::retry(format!(
                    "webhook {} unreachable: {}",
                    self.display_url,
                    // reqwest's errors name the URL they failed on, credentials included.
                    redact_text(&error_chain(&e))
                )));
            }
        };
        let status = response.status();
        let drop_reason = response
            .headers()
            .get(DROP_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // Read the reply to the end so the connection goes back to the pool; keep a
        // little of it for the error message.
        let reply = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            return match drop_reason {
                Some(reason) => Err(HandlerError::drop_entry(format!(
                    "the webhook dropped it: {reason}"
                ))),
                None => Ok(Effects::new()),
            };
        }
        let snippet: String = String::from_utf8_lossy(&reply[..reply.len().min(200)])
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let message = format!(
            "webhook {} answered {status}{}{}",
            self.display_url,
            if snippet.trim().is_empty() { "" } else { ": " },
            snippet.trim()
        );
        if status.as_u16() == 429 || status.is_server_error() {
            Err(HandlerError::retry(message))
        } else if status.is_redirection() {
            Err(HandlerError::permanent(format!(
                "{message} (redirects are not followed: point url at the final location)"
            )))
        } else {
            Err(HandlerError::permanent(message))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = source.and_then(|e| e.source());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EntryId, Origin};
    use std::sync::Arc;

    fn limits(handler_timeout_secs: u64) -> Limits {
        Limits {
            handler_timeout: Duration::from_secs(handler_timeout_secs),
            claim_idle: Duration::from_secs(120),
        }
    }

    fn options(url: &str) -> WebhookOptions {
        WebhookOptions {
            url: url.into(),
            timeout: Duration::from_secs(10),
            secret: Some("s3cret".into()),
            headers: BTreeMap::from([("Authorization".into(), "Bearer x".into())]),
        }
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Known answer: printf '1700000000.{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            Webhook::signature(b"key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn body_keeps_field_order() {
        let entry = Entry::new(
            Arc::new(Origin {
                stream: "orders".into(),
                group: "billing".into(),
                consumer: "c".into(),
            }),
            EntryId::new(1700000000000, 0),
            2,
            vec![
                (b"z".to_vec(), b"1".to_vec()),
                (b"a".to_vec(), b"2".to_vec()),
            ],
        );
        let body = serde_json::to_string(&Body(&entry)).unwrap();
        assert_eq!(
            body,
            r#"{"stream":"orders","group":"billing","id":"1700000000000-0","delivery_count":2,"fields":{"z":"1","a":"2"}}"#
        );
    }

    #[test]
    fn validation_and_redaction() {
        assert!(
            options("http://127.0.0.1:8080/x")
                .validate(&limits(30))
                .is_empty()
        );
        let bad = options("ftp://x").validate(&limits(30));
        assert_eq!(bad[0].key, "url");
        let slow = options("http://x").validate(&limits(5));
        assert_eq!(slow[0].key, "timeout");
        let r = options("http://u:pw@host/").redacted();
        assert!(!format!("{r:?}").contains("pw@"));
        assert!(!format!("{r:?}").contains("s3cret"));
        assert!(!format!("{r:?}").contains("Bearer"));
    }

    #[test]
    fn odd_stream_names_still_make_valid_headers() {
        assert_eq!(header_value("s/1-0").to_str().unwrap(), "s/1-0");
        assert_eq!(header_value("é/1-0").to_str().unwrap(), "%C3%A9/1-0");
    }
}
