//! The lean reader (`src/client/wire.rs`) over TLS: a `rediss://` group reads through it,
//! with the configured CA and client certificate, and gets every entry intact, big ones
//! spanning many TLS records and pipelined reads included.

use std::time::Duration;

use crate::support::RedisServer;
use crate::support::topology::Certificates;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn tls_config(certs: &Certificates, port: u16) -> streamworker::config::RedisConfig {
    streamworker::config::RedisConfig {
        url: format!("rediss://127.0.0.1:{port}/0"),
        tls: Some(streamworker::config::TlsConfig {
            ca_file: Some(certs.path("ca.crt")),
            cert_file: Some(certs.path("client.crt")),
            key_file: Some(certs.path("client.key")),
        }),
        ..Default::default()
    }
}

/// A redis-rs connection with the same certificates, for setting up and checking.
fn admin(certs: &Certificates, port: u16) -> redis::Connection {
    let read = |f: &str| std::fs::read(certs.path(f)).unwrap();
    redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/0"),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read("client.crt"),
                client_key: read("client.key"),
            }),
            root_cert: Some(read("ca.crt")),
        },
    )
    .unwrap()
    .get_connection()
    .unwrap()
}

#[test]
fn rediss_reads_go_through_the_lean_reader_and_arrive_intact() {
    let certs = Certificates::generate();
    let args = certs.server_args();
    let redis = RedisServer::start_unprobed(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut con = admin(&certs, redis.port);
    let big = "x".repeat(200_000);
    let mut expected: Vec<(String, Fields)> = Vec::new();
    for i in 0..1500 {
        let value = if i % 500 == 7 {
            big.clone()
        } else {
            format!("value-{i}")
        };
        let id: String = redis::cmd("XADD")
            .arg("s")
            .arg("*")
            .arg("n")
            .arg(i)
            .arg("v")
            .arg(&value)
            .query(&mut con)
            .unwrap();
        expected.push((
            id,
            vec![
                (b"n".to_vec(), i.to_string().into_bytes()),
                (b"v".to_vec(), value.into_bytes()),
            ],
        ));
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("s")
        .arg("g")
        .arg("0")
        .query(&mut con)
        .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let client = streamworker::client::Client::connect(&tls_config(&certs, redis.port))
            .await
            .unwrap();
        let reader = client
            .reader("s", Duration::from_millis(50), "tls-test")
            .await
            .unwrap();
        assert!(
            reader.is_lean(),
            "a rediss:// reader must use the lean reader"
        );
        let mut got = Vec::new();
        loop {
            // Two reads in flight at once, pipelined on the one TLS connection, as the
            // consumer loop keeps them while there is a backlog.
            let (a, b) = tokio::join!(
                reader.read_new("s", "g", "c", 400, Duration::from_millis(50)),
                reader.read_new("s", "g", "c", 400, Duration::from_millis(50)),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            if a.is_empty() && b.is_empty() {
                break;
            }
            got.extend(a);
            got.extend(b);
        }
        got
    });
    assert_eq!(got.len(), expected.len());
    for (entry, (id, fields)) in got.iter().zip(&expected) {
        assert_eq!(&entry.id.to_string(), id);
        assert_eq!(entry.delivery_count, 1);
        assert!(&entry.fields == fields, "entry {id} differs");
    }
    // Everything read is pending for the consumer: the reads really went to the server.
    let pending: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg("s")
        .arg("g")
        .query(&mut con)
        .unwrap();
    assert_eq!(pending.0, 1500);
}
