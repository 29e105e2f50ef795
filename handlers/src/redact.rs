//! Keeping secrets out of what streamworker prints: logs, spans, metrics, dead letters,
//! `check` and error messages. One set of rules for both crates, so that a URL printed by
//! a handler's error and the same URL printed by the configuration check look alike.
//!
//! - [`redact_url`]: a URL's password (`scheme://user:password@host`, or a lone
//!   `scheme://token@host`, which Redis clients read as a password) and the values of its
//!   query parameters named like secrets (`?token=…`, `?api_key=…`) become `<redacted>`.
//! - [`redact_text`]: the same for every URL inside free text, such as an HTTP client's
//!   error, which names the URL it failed on.
//! - [`is_secret_name`]: whether a key or parameter name suggests a secret, so that its
//!   value is never echoed.

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Whether `name` (a configuration key, a query parameter, a header) suggests a secret:
/// it contains `password`, `passwd`, `pwd`, `secret`, `token`, `key`, `auth`, `credential`,
/// `signature` or `sig`, in any case. Errs on the side of hiding.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "pwd",
        "pass",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "signature",
        "sig",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// Hides the password of `scheme://user:password@host…` (all of a lone
/// `scheme://token@host`) and the values of query parameters named like secrets. Text that
/// is not a URL comes back unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The authority ends at the first '/', '?' or '#'; a password may hold '@', so the
    // userinfo ends at the authority's last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..scheme_end + 3]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                None if !userinfo.is_empty() => out.push_str(REDACTED),
                None => {}
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if is_secret_name(name) => format!("{name}={REDACTED}"),
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

/// [`redact_url`] applied to every URL in `text` (a `scheme://` up to the next whitespace
/// or quote), leaving the rest as it was. For messages that may quote a URL: HTTP client
/// errors, connection errors, parse errors.
pub fn redact_text(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(sep) = rest.find("://") {
        // The scheme: letters, digits, '+', '-', '.' right before "://".
        let scheme_start = rest[..sep]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(sep, |(i, _)| i);
        let end = rest[sep + 3..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map_or(rest.len(), |i| sep + 3 + i);
        // Punctuation that closes the sentence around the URL stays outside it.
        let url = rest[scheme_start..end].trim_end_matches([')', ',', ';', ':', '.', ']']);
        let url_end = scheme_start + url.len();
        out.push_str(&rest[..scheme_start]);
        if scheme_start == sep {
            // "://" without a scheme: not a URL, copied as is.
            out.push_str(&rest[sep..url_end]);
        } else {
            out.push_str(&redact_url(url));
        }
        // Always past the "://", so the loop advances.
        rest = &rest[url_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_and_secret_parameters() {
        for (url, redacted) in [
            (
                "redis://:hunter2@redis:6379/0",
                "redis://:<redacted>@redis:6379/0",
            ),
            (
                "rediss://app:p@ss@redis:6380",
                "rediss://app:<redacted>@redis:6380",
            ),
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            ("redis://tok@redis", "redis://<redacted>@redis"),
            (
                "https://u:pw@hooks.example/x?token=abc&n=1#frag",
                "https://u:<redacted>@hooks.example/x?token=<redacted>&n=1#frag",
            ),
            (
                "http://h/x?api_key=1&Signature=2&plain=3",
                "http://h/x?api_key=<redacted>&Signature=<redacted>&plain=3",
            ),
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn urls_inside_text_are_found() {
        assert_eq!(
            redact_text(
                "error sending request for url (http://ops:s3cret@127.0.0.1:9/x?token=t0k): connection refused"
            ),
            "error sending request for url (http://ops:<redacted>@127.0.0.1:9/x?token=<redacted>): connection refused"
        );
        assert_eq!(
            redact_text("a \"redis://:pw@h\" and rediss://u:pw@h2."),
            "a \"redis://:<redacted>@h\" and rediss://u:<redacted>@h2."
        );
        assert_eq!(redact_text("odd ://x@y text"), "odd ://x@y text");
        assert_eq!(redact_text("no urls at all"), "no urls at all");
        assert_eq!(redact_text("é://ü@x"), "é://ü@x");
    }

    #[test]
    fn secret_names() {
        for name in [
            "password",
            "redis_PASSWORD",
            "secret",
            "token",
            "api_key",
            "Authorization",
            "passwd",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["url", "stream", "timeout", "concurrency", "n"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
