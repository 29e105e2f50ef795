//! Human durations in configuration (`"250ms"`, `"30s"`, `"5m"`, `"7d"`), with messages
//! that say what is wrong instead of serde's bare "expected a duration".
//!
//! Use as `#[serde(with = "streamworker_handlers::duration")]`, or
//! `duration::option` for an `Option<Duration>`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// The longest duration accepted anywhere: 100 years. Anything longer means "never" and
/// is better said otherwise; below it, every sum, product and deadline streamworker
/// derives from durations (backoff × (1 + jitter), now + claim_idle, milliseconds for
/// Redis) stays far from overflowing.
pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a human duration, explaining failures.
pub fn parse(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write durations like \"250ms\", \"30s\", \"5m\" or \"7d\"")
    })?;
    if d > MAX {
        return Err(format!(
            "`{text}` is longer than {} (100 years), the longest duration accepted; write a shorter one",
            format(MAX)
        ));
    }
    Ok(d)
}

/// Formats a duration the way `parse` reads it back, in the units people write:
/// `"7d"`, `"1h 30m"`, `"1s 500ms"`, `"0s"` (humantime's own formatter says `"7days"`
/// and counts months of 30.44 days).
pub fn format(d: Duration) -> String {
    const UNITS: [(&str, u128); 7] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let mut rest = d.as_nanos();
    if rest == 0 {
        return "0s".into();
    }
    let mut parts = Vec::new();
    for (unit, size) in UNITS {
        if rest >= size {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    parts.join(" ")
}

/// `d` cut down to whole milliseconds: derived durations print as people write them
/// (`"1s 666ms"`, not nanoseconds).
pub fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
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
        let e = parse("500000000y").unwrap_err();
        assert!(e.contains("longer than 36500d"), "{e}");
        assert_eq!(parse("36500d"), Ok(MAX));
        assert_eq!(format(Duration::from_millis(1500)), "1s 500ms");
        for (d, text) in [
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_secs(86_400 + 2 * 3600), "1d 2h"),
            (Duration::from_secs(90 * 86_400), "90d"),
            (Duration::from_secs(120), "2m"),
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1_500), "1ms 500us"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(parse(text), Ok(d), "{text} reads back");
        }
    }
}
