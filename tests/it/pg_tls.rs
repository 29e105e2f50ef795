//! The warehouse's PostgreSQL sink over TLS, as a managed database asks for it:
//! `sslmode=verify-full` with the provider's CA in `sslrootcert`, `verify-ca`, `require`
//! (encrypted, unverified), and `prefer`/`disable` as before.
//!
//! Each test starts a throwaway cluster (`initdb` + `pg_ctl` on a free port, `ssl=on`) whose
//! certificate, for `localhost` only, is signed by a CA made in the test (rcgen). Whether a
//! session is encrypted is read from the server's own `pg_stat_ssl`, over the Unix socket.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::support::postgres::PgCluster;
use crate::support::*;

/// A CA and a server certificate it signed, as PEM.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
}

fn make_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

/// A CA, and a server certificate for `localhost` (not for 127.0.0.1) signed by it.
fn make_pki() -> Pki {
    let (ca_pem, issuer) = make_ca("streamworker test CA");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    Pki {
        ca_pem,
        server_pem: cert.pem(),
        server_key_pem: key.serialize_pem(),
    }
}

/// The password of user `postgres` over TCP (SCRAM, as managed databases ask).
const PASSWORD: &str = "tls-test-secret";

/// A private cluster with `ssl=on` (unless started `plain`), serving the certificate of
/// `pki`; TCP clients log in with SCRAM, which binds the login to the TLS channel.
struct TlsCluster {
    pg: PgCluster,
    /// The CA that signed the server's certificate.
    ca_file: PathBuf,
}

impl TlsCluster {
    fn start(pki: &Pki) -> Self {
        Self::start_with(pki, true)
    }

    fn start_with(pki: &Pki, ssl: bool) -> Self {
        let mut ca_file = PathBuf::new();
        let pg = PgCluster::start(|dir| {
            ca_file = dir.join("ca.pem");
            std::fs::write(&ca_file, &pki.ca_pem).unwrap();
            let cert = dir.join("server.crt");
            let key = dir.join("server.key");
            let pwfile = dir.join("pwfile");
            std::fs::write(&pwfile, PASSWORD).unwrap();
            std::fs::write(&cert, &pki.server_pem).unwrap();
            std::fs::write(&key, &pki.server_key_pem).unwrap();
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            let auth = vec![
                format!("--pwfile={}", pwfile.display()),
                "--auth-local=trust".into(),
                "--auth-host=scram-sha-256".into(),
            ];
            let ssl = if ssl { "on" } else { "off" };
            let settings = format!(
                "-c ssl={ssl} -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
            (auth, settings)
        });
        Self { pg, ca_file }
    }

    /// A TCP URL to `host` with the query `params`.
    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/postgres?{params}",
            self.pg.port
        )
    }

    /// Runs SQL with psql over the Unix socket (no TLS involved); unaligned, tuples only.
    fn psql(&self, sql: &str) -> Result<String, String> {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.pg.dir.path().display(),
            self.pg.port
        );
        PgCluster::psql(Some(&self.pg.bin), &conninfo, sql)
    }

    /// Rows in `table`; 0 while it does not exist yet.
    fn count(&self, table: &str) -> u64 {
        match self.psql(&format!("SELECT count(*) FROM {table}")) {
            Ok(text) => text
                .parse()
                .unwrap_or_else(|e| panic!("count of {table}: {text:?}: {e}")),
            Err(e) if e.contains("does not exist") => 0,
            Err(e) => panic!("counting the rows of {table}: {e}"),
        }
    }

    /// Whether the sessions of `application_name` are encrypted, from the server's view:
    /// one `t`/`f` per session.
    fn ssl_of(&self, application: &str) -> Vec<bool> {
        let text = self
            .psql(&format!(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = '{application}'"
            ))
            .expect("pg_stat_ssl");
        text.lines().map(|l| l == "t").collect()
    }
}

/// A warehouse group on `stream` writing to `table` of `url`.
fn group(name: &str, url: &str) -> String {
    format!(
        r#"
[groups.{name}]
stream = "{name}"
handler = "warehouse"
payload = "json:event"
concurrency = 20
block = "2s"
handler_timeout = "2s"
claim_idle = "5s"
max_deliveries = 100
retry_backoff = {{ initial = "100ms", max = "500ms" }}
[groups.{name}.options]
sink = "postgres"
url = "{url}"
table = "{name}"
batch_size = 10
max_wait = "100ms"
"#
    )
}

fn events(n: usize) -> Vec<Vec<(&'static str, String)>> {
    (0..n)
        .map(|i| vec![("event", format!(r#"{{"event_type":"llm_call","n":{i}}}"#))])
        .collect()
}

#[test]
fn verify_full_with_the_providers_ca_stores_rows_over_tls() {
    let pki = make_pki();
    let pg = TlsCluster::start(&pki);
    let redis = RedisServer::start();
    let ca = pg.ca_file.display().to_string();
    let url = pg.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}&application_name=sw_full"),
    );
    let text = config(&redis.url(), "a", &group("verified", &url));

    // `check` takes the URL (it used to refuse any sslmode but disable/prefer).
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &text);
    let (code, stdout, stderr) = run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 0, "check refused verify-full: {stdout}{stderr}");

    let daemon = Daemon::start(&text);
    let mut con = redis.connection();
    produce(&mut con, "verified", &events(25));
    wait_until(Duration::from_secs(30), "25 rows over TLS", || {
        pg.count("verified") == 25
    });
    let sessions = pg.ssl_of("sw_full");
    assert!(
        !sessions.is_empty() && sessions.iter().all(|ssl| *ssl),
        "the sink's sessions are not all encrypted: {sessions:?}\n{}",
        daemon.logs()
    );
}

#[test]
fn a_wrong_ca_or_host_is_refused_with_the_reason_and_verify_ca_skips_the_name() {
    let pki = make_pki();
    let pg = TlsCluster::start(&pki);
    let redis = RedisServer::start();
    // A CA that did not sign the server's certificate.
    let (other_ca, _) = make_ca("some other CA");
    let dir = tempfile::tempdir().unwrap();
    let wrong_ca = dir.path().join("other-ca.pem");
    std::fs::write(&wrong_ca, other_ca).unwrap();
    let ca = pg.ca_file.display().to_string();
    let groups = [
        group(
            "wrongca",
            &pg.url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", wrong_ca.display()),
            ),
        ),
        // The certificate is for localhost, not for the address.
        group(
            "wronghost",
            &pg.url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
        ),
        group(
            "caonly",
            &pg.url(
                "127.0.0.1",
                &format!("sslmode=verify-ca&sslrootcert={ca}&application_name=sw_ca"),
            ),
        ),
    ]
    .concat();
    let daemon = Daemon::start(&config(&redis.url(), "a", &groups));
    let mut con = redis.connection();
    for stream in ["wrongca", "wronghost", "caonly"] {
        produce(&mut con, stream, &events(5));
    }
    daemon.wait_for_log(
        Duration::from_secs(30),
        "is not signed by the CA in sslrootcert",
    );
    daemon.wait_for_log(
        Duration::from_secs(30),
        "is not issued for the host in the url",
    );
    wait_until(Duration::from_secs(30), "verify-ca's rows", || {
        pg.count("caonly") == 5
    });
    let logs = daemon.logs();
    // The lines name the file to fix and the way out.
    assert!(
        logs.contains(&wrong_ca.display().to_string()),
        "the wrong CA's file is not named: {logs}"
    );
    assert!(logs.contains("sslmode=verify-ca"), "{logs}");
    assert_eq!(pg.count("wrongca"), 0, "a row went to an unverified server");
    assert_eq!(pg.count("wronghost"), 0, "a row went to the wrong host");
    assert!(pg.ssl_of("sw_ca").iter().all(|ssl| *ssl));
}

#[test]
fn require_encrypts_without_a_ca_and_prefer_and_disable_still_work() {
    let pki = make_pki();
    let pg = TlsCluster::start(&pki);
    let redis = RedisServer::start();
    let groups = [
        group(
            "req",
            &pg.url("127.0.0.1", "sslmode=require&application_name=sw_require"),
        ),
        group(
            "pref",
            &pg.url("127.0.0.1", "sslmode=prefer&application_name=sw_prefer"),
        ),
        group(
            "plain",
            &pg.url("127.0.0.1", "sslmode=disable&application_name=sw_disable"),
        ),
    ]
    .concat();
    let daemon = Daemon::start(&config(&redis.url(), "a", &groups));
    let mut con = redis.connection();
    for stream in ["req", "pref", "plain"] {
        produce(&mut con, stream, &events(10));
    }
    wait_until(Duration::from_secs(30), "the rows of every group", || {
        ["req", "pref", "plain"]
            .iter()
            .all(|table| pg.count(table) == 10)
    });
    let logs = daemon.logs();
    for (application, encrypted) in [
        ("sw_require", true),
        ("sw_prefer", true),
        ("sw_disable", false),
    ] {
        let sessions = pg.ssl_of(application);
        assert!(
            !sessions.is_empty() && sessions.iter().all(|ssl| *ssl == encrypted),
            "{application}: sessions encrypted {sessions:?}, expected all {encrypted}\n{logs}"
        );
    }
}

/// `check` takes every sslmode libpq has (but `allow`), refuses a verify mode without a
/// readable CA, and says how to fix it, the password redacted.
#[test]
fn check_takes_tls_urls_and_refuses_a_verify_mode_without_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let check = |url: &str| {
        let text = format!(
            r#"
[groups.warehouse]
stream = "ml_events"
handler = "warehouse"
[groups.warehouse.options]
sink = "postgres"
url = "{url}"
"#
        );
        let (code, _, stderr) = run_cli(&["check", "-c", &write_config(dir.path(), &text)], &[]);
        (code, stderr)
    };
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, make_ca("check CA").0).unwrap();
    let ca = ca.display().to_string();
    for params in [
        "".to_owned(),
        "?sslmode=disable".to_owned(),
        "?sslmode=prefer".to_owned(),
        "?sslmode=require".to_owned(),
        format!("?sslmode=verify-ca&sslrootcert={ca}"),
        format!("?sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let (code, stderr) = check(&format!("postgres://u:pw@db:5432/events{params}"));
        assert_eq!(code, 0, "{params}: {stderr}");
    }
    let (code, stderr) = check("postgres://u:pw@db:5432/events?sslmode=verify-full");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("groups.warehouse.options.url") && stderr.contains("add sslrootcert="),
        "{stderr}"
    );
    assert!(
        !stderr.contains(":pw@"),
        "the password stays redacted: {stderr}"
    );
    let missing = dir.path().join("no-such-ca.pem").display().to_string();
    let (code, stderr) = check(&format!(
        "host=db user=u password=pw sslmode=verify-ca sslrootcert={missing}"
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&missing), "the CA file is named: {stderr}");
    assert!(!stderr.contains("password=pw"), "{stderr}");
    let (code, stderr) = check("postgres://u:pw@db/events?sslmode=require&sslcert=/c.pem");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("client certificates are not supported"),
        "{stderr}"
    );
}

#[test]
fn require_against_a_server_without_tls_is_refused_with_the_fix() {
    let pki = make_pki();
    let pg = TlsCluster::start_with(&pki, false);
    let redis = RedisServer::start();
    let groups = [
        group("req", &pg.url("127.0.0.1", "sslmode=require")),
        // prefer falls back to plain text, as before.
        group(
            "pref",
            &pg.url("127.0.0.1", "sslmode=prefer&application_name=sw_prefer"),
        ),
    ]
    .concat();
    let daemon = Daemon::start(&config(&redis.url(), "a", &groups));
    let mut con = redis.connection();
    for stream in ["req", "pref"] {
        produce(&mut con, stream, &events(5));
    }
    daemon.wait_for_log(
        Duration::from_secs(30),
        "sslmode=require needs TLS but the server does not offer it",
    );
    wait_until(
        Duration::from_secs(30),
        "prefer's rows in plain text",
        || pg.count("pref") == 5,
    );
    assert_eq!(
        pg.count("req"),
        0,
        "a row went over plain text with require"
    );
    assert!(
        pg.ssl_of("sw_prefer").iter().all(|ssl| !*ssl),
        "the server has no TLS, yet a session is encrypted"
    );
    assert!(
        !daemon.logs().contains(PASSWORD),
        "the password is in the log"
    );
}

/// `sslrootcert=system` (libpq 16): the host's CAs, verify-full implied. The test points
/// the host's store at its CA through `SSL_CERT_FILE`, as an image with a custom bundle
/// would.
#[test]
fn sslrootcert_system_trusts_the_hosts_cas_with_verify_full() {
    let pki = make_pki();
    let pg = TlsCluster::start(&pki);
    let redis = RedisServer::start();
    let url = pg.url("localhost", "sslrootcert=system&application_name=sw_system");
    let ca = pg.ca_file.display().to_string();
    let daemon = Daemon::start_with_env(
        &config(&redis.url(), "a", &group("sys", &url)),
        &[("SSL_CERT_FILE", ca.as_str())],
    );
    let mut con = redis.connection();
    produce(&mut con, "sys", &events(5));
    wait_until(Duration::from_secs(30), "5 rows over verified TLS", || {
        pg.count("sys") == 5
    });
    assert!(pg.ssl_of("sw_system").iter().all(|ssl| *ssl));
    drop(daemon);

    // The same URL on a host whose store lacks the CA: refused, with the reason.
    let other = tempfile::tempdir().unwrap();
    let bundle = other.path().join("bundle.pem");
    std::fs::write(&bundle, make_ca("a public CA").0).unwrap();
    let bundle = bundle.display().to_string();
    let daemon = Daemon::start_with_env(
        &config(&redis.url(), "b", &group("sys2", &url)),
        &[("SSL_CERT_FILE", bundle.as_str())],
    );
    produce(&mut con, "sys2", &events(1));
    daemon.wait_for_log(
        Duration::from_secs(30),
        "is not signed by the CA in sslrootcert (system)",
    );
    assert_eq!(pg.count("sys2"), 0);
}
