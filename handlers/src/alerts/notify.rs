//! What a transition tells the world: the alerts stream's fields, the Pub/Sub message, the
//! webhook post, and the number formats they share.

use std::time::{Duration, UNIX_EPOCH};

use super::options::{RuleKind, human, redact_webhook};
use super::{Alert, Alerts, Change};

impl Alerts {
    pub(super) fn event_fields(&self, a: &Alert) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(&str, String)> = vec![
            ("rule", a.rule.clone()),
            ("kind", a.kind.as_str().into()),
            ("state", a.change.as_str().into()),
            ("stream", self.stream.clone()),
            ("group", self.group.clone()),
            ("value", number(a.value)),
        ];
        if let Some(t) = a.threshold {
            out.push(("threshold", number(t)));
        }
        if let Some(w) = a.window {
            out.push(("window", human(w)));
        }
        out.push(("at", rfc3339(a.at)));
        if let (Change::Resolved, Some(f)) = (a.change, a.fired_at) {
            out.push(("fired_at", rfc3339(f)));
        }
        out.push(("message", a.message.clone()));
        out.into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
            .collect()
    }

    pub(super) fn event_json(&self, a: &Alert) -> serde_json::Value {
        let mut v = serde_json::json!({
            "rule": a.rule,
            "kind": a.kind.as_str(),
            "state": a.change.as_str(),
            "stream": self.stream,
            "group": self.group,
            "value": a.value,
            "threshold": a.threshold,
            "window": a.window.map(human),
            "at": rfc3339(a.at),
            "message": a.message,
        });
        if let (Change::Resolved, Some(f)) = (a.change, a.fired_at) {
            v["fired_at"] = rfc3339(f).into();
        }
        v
    }

    /// POSTs `{"text": …}` for each alert, all at once; failures are logged.
    pub(super) async fn notify(&self, alerts: &[Alert]) {
        let Some((client, url)) = &self.webhook else {
            return;
        };
        let posts = alerts.iter().map(|a| async move {
            let icon = match a.change {
                Change::Firing => ":rotating_light:",
                Change::Resolved => ":white_check_mark:",
            };
            let body = serde_json::json!({ "text": format!("{icon} {}", a.message) });
            let result = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let problem = match result {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("answered {}", r.status())),
                Err(e) => Some(crate::one_line(e.without_url())),
            };
            if let Some(error) = problem {
                tracing::warn!(stream = %self.stream, group = %self.group, rule = %a.rule, state = a.change.as_str(), webhook = %redact_webhook(url.as_str()), error = %error, "could not deliver an alert to the webhook (the event is on the alerts stream)");
            }
        });
        futures_util::future::join_all(posts).await;
    }
}

pub(super) fn show(kind: RuleKind, x: f64) -> String {
    match kind {
        RuleKind::Rate => percent(x),
        _ => number(x),
    }
}

pub(super) fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let text = format!("{x:.6}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

pub(super) fn percent(x: f64) -> String {
    let text = format!("{:.2}", x * 100.0);
    format!("{} %", text.trim_end_matches('0').trim_end_matches('.'))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
