//! The PostgreSQL sink: one transaction per batch into a table keyed by `(stream, id)`.
//!
//! The table is created if missing:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS streamworker_events (
//!     stream      text        NOT NULL,
//!     id          text        NOT NULL,  -- the entry id, `<ms>-<seq>` (the original id of a replay)
//!     "time"      timestamptz NOT NULL,  -- from the id
//!     event_type  text,
//!     payload     jsonb       NOT NULL,  -- the fields as an object, or the JSON document
//!     inserted_at timestamptz NOT NULL DEFAULT now(),
//!     PRIMARY KEY (stream, id)
//! )
//! ```
//!
//! A batch is one `INSERT … SELECT … FROM unnest($arrays) ON CONFLICT DO NOTHING RETURNING
//! id` in one transaction: a redelivered entry meets its own row and inserts nothing (it is
//! reported as a dropped duplicate), so a crash anywhere — before, during or after the
//! commit — never makes a second row.
//!
//! Failures:
//! - the server unreachable, the connection lost, any error but a data error → the whole
//!   batch is retried; the connection is dropped and a new one made for the next batch;
//! - a data error (SQLSTATE class 22, e.g. a `\u0000` that jsonb cannot store, or 54) → the
//!   batch is redone row by row under savepoints in one transaction: the rows PostgreSQL
//!   refuses fail permanently (dead-lettered), every other row is stored.
//!
//! TLS follows libpq's `sslmode` in the connection string, over rustls (ring):
//! - `disable`: plain TCP;
//! - `prefer` (the default, as in libpq): TLS when the server offers it, plain otherwise,
//!   the certificate not checked;
//! - `require`: TLS or no connection; encrypted but the certificate not checked (anyone
//!   on the path can pose as the server), unless `sslrootcert` is set: then as `verify-ca`
//!   (libpq does the same);
//! - `verify-ca`: the certificate must chain to a CA in `sslrootcert=<PEM file>`;
//! - `verify-full`: and name the host of the URL too — what a managed database wants.
//!   `sslrootcert=system` means the host's CA store, and implies and requires it.
//!
//! tokio-postgres knows neither the verify modes nor `sslrootcert`, so both are taken out
//! of the string before it parses the rest, and rustls does the checks.
//! Connections are pooled per group and replica: one per batch in flight, made on demand.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Context, PayloadJson, Recorder, WarehouseOptions};
use crate::{Effects, Entry, EntryId, HandlerError};

/// Idle connections kept for the next batches.
const IDLE_CONNECTIONS: usize = 4;

pub struct PostgresSink {
    config: Config,
    /// `None` for `sslmode=disable`.
    tls: Option<MakeRustlsConnect>,
    mode: TlsMode,
    root_cert: Option<PathBuf>,
    /// For logs: the URL without its password.
    display: String,
    table: String,
    stream: String,
    recorder: Recorder,
    idle: Mutex<Vec<Connection>>,
    /// The last connection attempt failed (so a recovery is logged once).
    failing: std::sync::atomic::AtomicBool,
}

struct Connection {
    client: Client,
    insert: Statement,
}

/// One row to insert.
struct Row {
    id: String,
    time: SystemTime,
    event_type: Option<String>,
    payload: String,
}

/// Why a batch could not be stored.
enum Failure {
    /// Nothing was stored; retry every entry.
    Batch(String),
    /// The data of some row was refused.
    Data(String),
}

/// libpq's `sslmode` values (but `allow`, which tokio-postgres cannot do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn name(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// A connection string as the sink uses it.
pub(crate) struct Target {
    pub config: Config,
    pub mode: TlsMode,
    pub root_cert: Option<PathBuf>,
    /// The TLS connector, `None` for `sslmode=disable`.
    pub tls: Option<MakeRustlsConnect>,
}

/// Parses a connection string the way the sink will use it, reading the `sslrootcert`
/// file, so `check` finds a missing or empty CA file before the daemon starts.
pub(crate) fn parse_url(url: &str) -> Result<Target, String> {
    let (rest, sslmode, root_cert) = take_tls_keys(url);
    // tokio-postgres would say only "invalid connection string".
    for key in ["sslcert", "sslkey", "sslpassword"] {
        if Config::from_str(&rest).is_err() && has_key(&rest, key) {
            return Err(format!(
                "{key}: client certificates are not supported by the warehouse: remove {key} and log in with a password (over sslmode=verify-full)"
            ));
        }
    }
    let mut config = Config::from_str(&rest)
        .map_err(|e| format!("not a PostgreSQL connection string: {}", describe(&e)))?;
    // libpq 16: `sslrootcert=system` trusts the host's CAs, and then only verify-full.
    let system = root_cert.as_deref() == Some("system");
    let mode = match sslmode.as_deref() {
        None if system => TlsMode::VerifyFull,
        None | Some("prefer") => TlsMode::Prefer,
        Some("disable") => TlsMode::Disable,
        // libpq: "if a root CA file exists, require behaves as verify-ca".
        Some("require") if root_cert.is_some() => TlsMode::VerifyCa,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(other) => {
            return Err(format!(
                "sslmode={other} is not supported: use disable, prefer, require, verify-ca or verify-full"
            ));
        }
    };
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    if system && mode != TlsMode::VerifyFull {
        return Err(format!(
            "sslrootcert=system with sslmode={}: the host's CAs vouch for any public name, so only sslmode=verify-full is safe with them (as in libpq); use verify-full, or give the CA file itself",
            sslmode.as_deref().unwrap_or_default()
        ));
    }
    let root_cert = root_cert.map(PathBuf::from);
    let roots = match (&root_cert, mode) {
        (Some(_), TlsMode::VerifyFull) if system => Some(system_roots()?),
        (None, TlsMode::VerifyCa | TlsMode::VerifyFull) => {
            return Err(format!(
                "sslmode={} checks the server's certificate against a CA, but no CA is given: add sslrootcert=/path/to/ca.pem (for a managed database, the provider's CA bundle)",
                mode.name()
            ));
        }
        (Some(path), TlsMode::VerifyCa | TlsMode::VerifyFull) => Some(load_roots(path)?),
        _ => None,
    };
    let tls = match mode {
        TlsMode::Disable => None,
        _ => Some(MakeRustlsConnect::new(client_config(mode, roots)?)),
    };
    Ok(Target {
        config,
        mode,
        root_cert,
        tls,
    })
}

/// Takes `sslmode` and `sslrootcert` out of a URL or `key=value` connection string: the
/// rest, the mode, the CA file.
fn take_tls_keys(url: &str) -> (String, Option<String>, Option<String>) {
    let mut mode = None;
    let mut root_cert = None;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None, None);
        };
        let mut kept = Vec::new();
        for param in query.split('&') {
            match param.split_once('=') {
                Some(("sslmode", v)) => mode = Some(percent_decode(v)),
                Some(("sslrootcert", v)) => root_cert = Some(percent_decode(v)),
                _ => kept.push(param),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root_cert);
    }
    // key=value form: keep every pair as written but the two keys.
    let mut rest = String::with_capacity(url.len());
    for (key, value, raw) in key_value_pairs(url) {
        match key {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root_cert = Some(value),
            _ => {
                rest.push_str(raw);
                rest.push(' ');
            }
        }
    }
    (rest.trim_end().to_owned(), mode, root_cert)
}

/// The pairs of a `key = value` string: key, unquoted value, the pair as written. Values
/// may be quoted with `'`, with `\` escaping; malformed text is passed on as a pair with
/// an empty key so tokio-postgres reports it.
fn key_value_pairs(s: &str) -> Vec<(&str, String, &str)> {
    let mut pairs = Vec::new();
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < s.len() {
        while i < s.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        while i < s.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= s.len() || bytes[i] != b'=' {
            pairs.push(("", String::new(), &s[start..i]));
            continue;
        }
        i += 1;
        while i < s.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        let quoted = i < s.len() && bytes[i] == b'\'';
        if quoted {
            i += 1;
        }
        let mut escaped = false;
        let from = i;
        i = s.len();
        for (j, c) in s[from..].char_indices() {
            let at = from + j;
            if escaped {
                value.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if quoted && c == '\'' {
                i = at + 1;
                break;
            } else if !quoted && c.is_whitespace() {
                i = at;
                break;
            } else {
                value.push(c);
            }
        }
        pairs.push((key, value, &s[start..i]));
    }
    pairs
}

/// Whether a connection string sets `key` (either form).
fn has_key(url: &str, key: &str) -> bool {
    if let Some((_, query)) = url.split_once('?') {
        return query
            .split('&')
            .any(|p| p.split_once('=').is_some_and(|(k, _)| k == key));
    }
    key_value_pairs(url).iter().any(|(k, _, _)| *k == key)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The CA certificates of a PEM file.
fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let named = |e: &dyn std::fmt::Display| {
        format!(
            "sslrootcert={}: {e}: set it to a readable PEM file of the CA certificates that sign the server's",
            path.display()
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| named(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| named(&e))?;
    if certs.is_empty() {
        return Err(named(&"no certificate in the file"));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| named(&format!("not a CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// The host's CAs (`sslrootcert=system`): the system store, or `SSL_CERT_FILE` /
/// `SSL_CERT_DIR` when set.
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "sslrootcert=system: no CA certificate found on this host{}: install the ca-certificates package, set SSL_CERT_FILE to a PEM bundle, or set sslrootcert to the CA file itself",
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            }
        ));
    }
    Ok(roots)
}

fn client_config(
    mode: TlsMode,
    roots: Option<RootCertStore>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        Some(roots) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert: {e}"))?;
            if mode == TlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(CaOnly(webpki))
            }
        }
        None => Arc::new(Unverified(provider.clone())),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `sslmode=verify-ca`: the chain must end at a trusted CA; the name is not checked.
/// rustls checks the name last, so a name error means the chain was good.
#[derive(Debug)]
struct CaOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `sslmode=require` or `prefer` without a CA: encrypted, but any certificate is taken
/// (libpq's behaviour). The handshake signatures are still checked, so the session is
/// bound to the certificate the server showed.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

const NAME_HINT: &str = "the server's certificate is not issued for the host in the url: connect by a host name the certificate lists, or use sslmode=verify-ca to check the CA only";

/// What to do about a failed TLS handshake, when the error says why it failed.
fn tls_hint(e: &tokio_postgres::Error, mode: TlsMode, root_cert: Option<&Path>) -> Option<String> {
    let ca = root_cert.map_or_else(String::new, |p| format!(" ({})", p.display()));
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        let rustls_error = cause.downcast_ref::<rustls::Error>().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = rustls_error {
            return Some(match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate is not signed by the CA in sslrootcert{ca}: set sslrootcert to the CA that signed it (for a managed database, the provider's CA bundle)"
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => NAME_HINT.into(),
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is expired or not yet valid: renew it on the server, or check this host's clock".into()
                }
                other => format!(
                    "the server's certificate is refused ({other:?}): check it against sslrootcert{ca}"
                ),
            });
        }
        // tokio-postgres's own refusal, a plain message under its TLS error.
        if cause.to_string().contains("server does not support TLS") {
            return Some(format!(
                "sslmode={} needs TLS but the server does not offer it: turn ssl on in the server, or use sslmode=prefer or disable on a private network",
                mode.name()
            ));
        }
        source = cause.source();
    }
    None
}

/// Hides the password of a `postgres://user:password@…` URL, of a `password=` query
/// parameter, or of a `password=…` key in the `key=value` form.
pub fn redact_url(url: &str) -> String {
    const REDACTED: &str = super::REDACTED;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // user:password@ sits between the scheme and the first '/', '?' after it.
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let mut out = url[..scheme_end].to_owned();
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        let tail = &rest[authority_end..];
        match tail.split_once('?') {
            Some((path, query)) => {
                out.push_str(path);
                out.push('?');
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                            format!("{k}={REDACTED}")
                        }
                        _ => p.to_owned(),
                    })
                    .collect();
                out.push_str(&params.join("&"));
            }
            None => out.push_str(tail),
        }
        return out;
    }
    // key=value form: find `password`, optional spaces, `=`, then a quoted or bare value.
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(i) = rest.find("password") {
        let (before, from) = rest.split_at(i);
        out.push_str(before);
        let after_key = &from["password".len()..];
        let trimmed = after_key.trim_start();
        let at_word_start = before.is_empty() || before.ends_with(char::is_whitespace);
        if !at_word_start || !trimmed.starts_with('=') {
            out.push_str("password");
            rest = after_key;
            continue;
        }
        let value = trimmed[1..].trim_start();
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut end = quoted.len();
            let mut escaped = false;
            for (j, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = j + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str("password=");
        out.push_str(REDACTED);
        rest = &value[value_len.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// `table` or `schema.table`, each part a lower-case identifier of at most 63 bytes (so it
/// needs no quoting and means the same to every tool).
pub(crate) fn check_table_name(table: &str) -> Result<(), String> {
    let parts: Vec<&str> = table.split('.').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err("must be a lower-case identifier (letters, digits, _), optionally schema-qualified: e.g. \"streamworker_events\" or \"analytics.llm_events\"".into())
    }
}

fn create_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            stream      text        NOT NULL,
            id          text        NOT NULL,
            \"time\"      timestamptz NOT NULL,
            event_type  text,
            payload     jsonb       NOT NULL,
            inserted_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (stream, id)
        )"
    )
}

fn insert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (stream, id, \"time\", event_type, payload)
         SELECT $1::text, r.id, r.t, r.e, r.p::jsonb
         FROM unnest($2::text[], $3::timestamptz[], $4::text[], $5::text[]) AS r(id, t, e, p)
         ON CONFLICT (stream, id) DO NOTHING
         RETURNING id"
    )
}

/// Errors in the data of a row: retrying cannot help, but the other rows can be stored.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("54"))
}

/// One line, with the SQLSTATE when the server sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let cause = cause.to_string();
                if !text.contains(&cause) {
                    text.push_str(": ");
                    text.push_str(&cause);
                }
                source = cause_of(source);
            }
            text
        }
    }
}

fn cause_of<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}

impl PostgresSink {
    pub(super) fn new(
        options: &WarehouseOptions,
        context: &Context,
        recorder: Recorder,
    ) -> Result<Self, String> {
        let url = options.url.as_deref().unwrap_or_default();
        let Target {
            mut config,
            mode,
            root_cert,
            tls,
        } = parse_url(url).map_err(|e| format!("url: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("streamworker");
        }
        check_table_name(options.table()).map_err(|e| format!("table: {e}"))?;
        Ok(Self {
            config,
            tls,
            mode,
            root_cert,
            display: redact_url(url),
            table: options.table().to_owned(),
            stream: context.stream.clone(),
            recorder,
            idle: Mutex::new(Vec::new()),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(super) async fn write_batch(
        &self,
        entries: &[Entry],
    ) -> Vec<Result<Effects, HandlerError>> {
        let ids: Vec<EntryId> = entries.iter().map(Entry::idempotency_id).collect();
        let twice = super::duplicates_in_batch(&ids);
        let mut results: Vec<Option<Result<Effects, HandlerError>>> = vec![None; entries.len()];
        let mut rows = Vec::with_capacity(entries.len());
        let mut row_entry = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if twice[i] {
                results[i] = Some(Err(super::duplicate_in_batch(ids[i])));
                continue;
            }
            match serde_json::to_string(&PayloadJson(entry)) {
                Ok(payload) => {
                    rows.push(Row {
                        id: ids[i].to_string(),
                        time: ids[i].time(),
                        event_type: self.recorder.event_type(entry).map(|t| t.into_owned()),
                        payload,
                    });
                    row_entry.push(i);
                }
                Err(e) => {
                    results[i] = Some(Err(HandlerError::permanent(format!(
                        "warehouse: cannot encode the payload as JSON: {e}"
                    ))));
                }
            }
        }
        if !rows.is_empty() {
            for (k, result) in self.store(&rows).await.into_iter().enumerate() {
                results[row_entry[k]] = Some(result.map_err(|e| match e {
                    RowError::Stored => super::already_stored(ids[row_entry[k]]),
                    RowError::Other(e) => e,
                }));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(HandlerError::retry("warehouse: no result"))))
            .collect()
    }

    /// Stores the rows: one result per row.
    async fn store(&self, rows: &[Row]) -> Vec<Result<Effects, RowError>> {
        let mut conn = match self.acquire().await {
            Ok(c) => c,
            Err(e) => return retry_all(rows.len(), &e),
        };
        match self.insert_batch(&mut conn, rows).await {
            Ok(inserted) => {
                self.release(conn);
                mark_inserted(rows, &inserted)
            }
            Err(Failure::Batch(e)) => retry_all(rows.len(), &e),
            Err(Failure::Data(e)) => {
                tracing::info!(table = %self.table, error = %e, rows = rows.len(), "warehouse: PostgreSQL refused the data of a batch; storing it row by row");
                match self.insert_each(&mut conn, rows).await {
                    Ok(results) => {
                        self.release(conn);
                        results
                    }
                    Err(e) => retry_all(rows.len(), &e),
                }
            }
        }
    }

    /// A pooled connection, or a new one (creating the table on it).
    async fn acquire(&self) -> Result<Connection, String> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(conn) = idle
            && !conn.client.is_closed()
        {
            return Ok(conn);
        }
        match self.connect().await {
            Ok(conn) => {
                if self
                    .failing
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!(postgres = %self.display, "warehouse: PostgreSQL is reachable again");
                }
                Ok(conn)
            }
            Err(e) => {
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(postgres = %self.display, error = %e, "warehouse: cannot use PostgreSQL; batches are retried");
                }
                Err(e)
            }
        }
    }

    fn release(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_CONNECTIONS && !conn.client.is_closed() {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<Connection, String> {
        let connected = match &self.tls {
            Some(tls) => self
                .config
                .connect(tls.clone())
                .await
                .map(|(client, connection)| {
                    spawn_connection(connection, self.display.clone());
                    client
                }),
            None => self
                .config
                .connect(NoTls)
                .await
                .map(|(client, connection)| {
                    spawn_connection(connection, self.display.clone());
                    client
                }),
        };
        let client =
            connected.map_err(
                |e| match tls_hint(&e, self.mode, self.root_cert.as_deref()) {
                    Some(hint) => format!(
                        "TLS to PostgreSQL at {} failed (sslmode={}): {}: {hint}",
                        self.display,
                        self.mode.name(),
                        describe(&e)
                    ),
                    None => format!(
                        "PostgreSQL at {} unreachable: {}",
                        self.display,
                        describe(&e)
                    ),
                },
            )?;
        let create = client.batch_execute(&create_table_sql(&self.table)).await;
        if let Err(e) = create {
            // Replicas starting together race on CREATE TABLE IF NOT EXISTS; the loser
            // sees the winner's table (or its type) as a duplicate.
            let raced = e.code().is_some_and(|c| {
                *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::DUPLICATE_TABLE
            });
            if !raced {
                return Err(format!(
                    "cannot create table {}: {}",
                    self.table,
                    describe(&e)
                ));
            }
        }
        let insert = client
            .prepare(&insert_sql(&self.table))
            .await
            .map_err(|e| {
                format!(
                    "cannot prepare the insert into {}: {}",
                    self.table,
                    describe(&e)
                )
            })?;
        Ok(Connection { client, insert })
    }

    /// The whole batch in one transaction; the ids inserted (the others were stored
    /// before).
    async fn insert_batch(
        &self,
        conn: &mut Connection,
        rows: &[Row],
    ) -> Result<Vec<String>, Failure> {
        let Connection { client, insert } = conn;
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let times: Vec<SystemTime> = rows.iter().map(|r| r.time).collect();
        let types: Vec<Option<&str>> = rows.iter().map(|r| r.event_type.as_deref()).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
        let fail = |e: tokio_postgres::Error| {
            if is_data_error(&e) {
                Failure::Data(describe(&e))
            } else {
                Failure::Batch(format!("PostgreSQL: {}", describe(&e)))
            }
        };
        let tx = client.transaction().await.map_err(fail)?;
        let inserted = tx
            .query(insert, &[&self.stream, &ids, &times, &types, &payloads])
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(inserted
            .iter()
            .filter_map(|row| row.try_get::<_, String>(0).ok())
            .collect())
    }

    /// Row by row under savepoints, in one transaction: refused rows fail permanently,
    /// the others are stored. `Err` when the batch as a whole must be retried.
    async fn insert_each(
        &self,
        conn: &mut Connection,
        rows: &[Row],
    ) -> Result<Vec<Result<Effects, RowError>>, String> {
        let Connection { client, insert } = conn;
        let batch = |e: tokio_postgres::Error| format!("PostgreSQL: {}", describe(&e));
        let mut tx = client.transaction().await.map_err(batch)?;
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            let savepoint = tx.savepoint("row").await.map_err(batch)?;
            let one = savepoint
                .query(
                    &*insert,
                    &[
                        &self.stream,
                        &[row.id.as_str()].as_slice(),
                        &[row.time].as_slice(),
                        &[row.event_type.as_deref()].as_slice(),
                        &[row.payload.as_str()].as_slice(),
                    ],
                )
                .await;
            match one {
                Ok(inserted) => {
                    savepoint.commit().await.map_err(batch)?;
                    results.push(if inserted.is_empty() {
                        Err(RowError::Stored)
                    } else {
                        Ok(Effects::new())
                    });
                }
                Err(e) if is_data_error(&e) => {
                    savepoint.rollback().await.map_err(batch)?;
                    results.push(Err(RowError::Other(HandlerError::permanent(format!(
                        "warehouse: PostgreSQL refused the row: {}",
                        describe(&e)
                    )))));
                }
                Err(e) => return Err(batch(e)),
            }
        }
        tx.commit().await.map_err(batch)?;
        Ok(results)
    }
}

/// Drives a connection until it closes; the client talks through it.
fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>, server: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(postgres = %server, error = %describe(&e), "warehouse: PostgreSQL connection closed");
        }
    });
}

enum RowError {
    /// The row was there already: a duplicate.
    Stored,
    Other(HandlerError),
}

fn retry_all(n: usize, reason: &str) -> Vec<Result<Effects, RowError>> {
    let e = HandlerError::retry(format!("warehouse: {reason}"));
    (0..n).map(|_| Err(RowError::Other(e.clone()))).collect()
}

fn mark_inserted(rows: &[Row], inserted: &[String]) -> Vec<Result<Effects, RowError>> {
    let inserted: std::collections::HashSet<&str> = inserted.iter().map(String::as_str).collect();
    rows.iter()
        .map(|r| {
            if inserted.contains(r.id.as_str()) {
                Ok(Effects::new())
            } else {
                Err(RowError::Stored)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/events?sslmode=disable"),
            "postgres://app:<redacted>@db:5432/events?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgresql://app@db/events?password=s3cret&x=1"),
            "postgresql://app@db/events?password=<redacted>&x=1"
        );
        assert_eq!(redact_url("postgres://db/events"), "postgres://db/events");
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=events"),
            "host=db user=app password=<redacted> dbname=events"
        );
        assert_eq!(
            redact_url(r"host=db password = 'it\'s secret' dbname=x"),
            "host=db password=<redacted> dbname=x"
        );
        assert_eq!(redact_url("passwordless=1"), "passwordless=1");
    }

    #[test]
    fn connection_strings_parse_with_their_sslmode() {
        let mode = |url: &str| parse_url(url).map(|t| t.mode);
        assert_eq!(
            mode("postgres://u:p@127.0.0.1:5432/db"),
            Ok(TlsMode::Prefer)
        );
        assert_eq!(
            mode("host=/tmp port=5433 user=postgres"),
            Ok(TlsMode::Prefer)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=disable"),
            Ok(TlsMode::Disable)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=require"),
            Ok(TlsMode::Require)
        );
        assert_eq!(
            mode("host=h sslmode = 'require' dbname=x"),
            Ok(TlsMode::Require)
        );
        assert!(
            parse_url("postgres://h/db?sslmode=disable")
                .unwrap()
                .tls
                .is_none()
        );
        assert!(parse_url("postgres://h/db?sslmode=allow").is_err());
        assert!(parse_url("postgres://h/db?sslmode=verify-full").is_err());
        assert!(parse_url("host=h sslmode=verify-ca").is_err());
        assert!(parse_url("mysql://h/db").is_err());
        let system = parse_url("postgres://h/db?sslrootcert=system&sslmode=require").err();
        assert!(
            system.as_deref().is_some_and(|e| e.contains("verify-full")),
            "{system:?}"
        );
        let client_cert = parse_url("postgres://h/db?sslmode=require&sslcert=/c.pem").err();
        assert!(
            client_cert
                .as_deref()
                .is_some_and(|e| e.starts_with("sslcert:")),
            "{client_cert:?}"
        );
    }

    #[test]
    fn tls_keys_are_taken_out_of_both_forms() {
        assert_eq!(
            take_tls_keys(
                "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x"
            ),
            (
                "postgres://u@h/db?application_name=x".to_owned(),
                Some("verify-full".to_owned()),
                Some("/etc/ca.pem".to_owned())
            )
        );
        assert_eq!(
            take_tls_keys("postgres://u@h/db?sslrootcert=/ca.pem"),
            (
                "postgres://u@h/db".to_owned(),
                None,
                Some("/ca.pem".to_owned())
            )
        );
        assert_eq!(
            take_tls_keys(
                r"host=h password='a b\'c' sslrootcert = '/my dir/ca.pem' sslmode=verify-ca dbname=x"
            ),
            (
                r"host=h password='a b\'c' dbname=x".to_owned(),
                Some("verify-ca".to_owned()),
                Some("/my dir/ca.pem".to_owned())
            )
        );
        // What tokio-postgres would refuse stays for it to refuse.
        assert_eq!(take_tls_keys("host=h junk").0, "host=h junk");
    }

    #[test]
    fn table_names() {
        assert!(check_table_name("streamworker_events").is_ok());
        assert!(check_table_name("analytics.llm_events").is_ok());
        assert!(check_table_name("Events").is_err());
        assert!(check_table_name("a.b.c").is_err());
        assert!(check_table_name("x; drop table y").is_err());
        assert!(check_table_name("").is_err());
    }

    #[test]
    fn sql_uses_the_table() {
        assert!(create_table_sql("a.b").contains("CREATE TABLE IF NOT EXISTS a.b ("));
        assert!(insert_sql("t").contains("ON CONFLICT (stream, id) DO NOTHING"));
    }
}
