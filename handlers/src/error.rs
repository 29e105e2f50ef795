//! What a handler says about an entry it could not simply finish.
//!
//! Every `?` in a handler states the entry's fate: there is deliberately no blanket
//! `From<anyhow::Error>` or `From<std::io::Error>`, so the author has to choose between
//! [`ResultExt::retryable`], [`ResultExt::permanent`] and [`ResultExt::drop_entry`].

use std::fmt;

/// Why a handler did not complete an entry, and therefore what happens to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Try again later (after the group's `retry_backoff`), on whichever replica is free.
    /// Timeouts and panics are reported as this kind too. When the entry's delivery count
    /// has reached `max_deliveries` it is dead-lettered instead.
    #[error("{0}")]
    Retry(String),
    /// Retrying cannot help (malformed payload, a 4xx from a webhook): dead-letter now.
    #[error("{0}")]
    Permanent(String),
    /// Not ours, a duplicate, or stale: acknowledge without a dead letter.
    #[error("{0}")]
    Drop(String),
}

impl HandlerError {
    // A reason ends up in logs, spans and dead letters: URLs in it lose their credentials.
    pub fn retry(reason: impl fmt::Display) -> Self {
        Self::Retry(crate::redact::redact_text(&one_line(reason)))
    }
    pub fn permanent(reason: impl fmt::Display) -> Self {
        Self::Permanent(crate::redact::redact_text(&one_line(reason)))
    }
    pub fn drop_entry(reason: impl fmt::Display) -> Self {
        Self::Drop(crate::redact::redact_text(&one_line(reason)))
    }
    /// The human explanation, one line.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retry(r) | Self::Permanent(r) | Self::Drop(r) => r,
        }
    }
    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retry(_) => "retry",
            Self::Permanent(_) => "permanent",
            Self::Drop(_) => "drop",
        }
    }
}

/// Flattens a message to one line: dead letters store the last error in one field and logs
/// are one JSON object per line.
pub fn one_line(reason: impl fmt::Display) -> String {
    let text = reason.to_string();
    if !text.contains(['\n', '\r']) {
        return text;
    }
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Turns any error into a [`HandlerError`] of the kind the call site chooses.
pub trait ResultExt<T> {
    /// The failure is transient: retry the entry after a backoff.
    fn retryable(self) -> Result<T, HandlerError>;
    /// The entry can never succeed: dead-letter it now.
    fn permanent(self) -> Result<T, HandlerError>;
    /// The entry is not worth handling: acknowledge it without a dead letter.
    fn drop_entry(self) -> Result<T, HandlerError>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retry)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn drop_entry(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::drop_entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_errors_become_one_line() {
        let e = HandlerError::retry("first\nsecond\r\n  third ");
        assert_eq!(e.reason(), "first | second | third");
    }

    #[test]
    fn result_ext_picks_the_kind() {
        let r: Result<(), &str> = Err("boom");
        assert_eq!(r.permanent(), Err(HandlerError::Permanent("boom".into())));
        let r: Result<(), &str> = Err("later");
        assert_eq!(r.retryable(), Err(HandlerError::Retry("later".into())));
    }
}
