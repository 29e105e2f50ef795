//! Human durations in configuration (`"250ms"`, `"30s"`, `"5m"`, `"7d"`), with messages
//! that say what is wrong instead of serde's bare "expected a duration".
//!
//! Use as `#[serde(with = "streamworker_handlers::duration")]`, or
//! `duration::option` for an `Option<Duration>`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses a human duration, explaining failures.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write durations like \"250ms\", \"30s\", \"5m\" or \"7d\"")
    })
}

/// Formats a duration the way `parse` reads it back.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(f64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(text) => parse(&text).map_err(serde::de::Error::custom),
        Raw::Number(n) => Err(serde::de::Error::custom(format!(
            "`{n}` has no unit; write durations as strings like \"{n}s\" or \"{n}ms\""
        ))),
    }
}

pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_explains() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        let e = parse("2 parsecs").unwrap_err();
        assert!(e.contains("`2 parsecs` is not a duration"), "{e}");
        assert!(e.contains("parsecs"), "{e}");
        assert_eq!(format(Duration::from_millis(1500)), "1s 500ms");
    }
}
