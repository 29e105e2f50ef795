//! How streamworker reaches Redis: a single server, Redis Cluster, or a primary followed
//! through Sentinel; with TLS (custom CA, client certificates) and ACL credentials.
//!
//! Whatever the deployment, the rest of `client` talks to a [`Commands`] (short commands,
//! shared, reconnecting by itself) and to per-group [`Reader`]s (blocking reads on a
//! connection of their own, next to a control connection for CLIENT UNBLOCK). Under
//! Cluster a reader connects straight to the node that owns its stream's slot; under
//! Sentinel everything resolves the current primary again after a failure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::config::RedisConfig;

fn config_error(what: &'static str, detail: String) -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, what, detail))
}

/// Credentials and TLS material shared by every connection of a deployment.
#[derive(Clone)]
pub(crate) struct Secrets {
    password: Option<String>,
    certs: Option<TlsCertificates>,
}

impl Secrets {
    pub(crate) fn load(config: &RedisConfig) -> RedisResult<Self> {
        let password = match &config.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        config_error(
                            "cannot read redis.password_file",
                            format!("{}: {e}", path.display()),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => None,
        };
        let certs = match &config.tls {
            Some(tls) => {
                let read = |key: &'static str, path: &std::path::Path| {
                    std::fs::read(path)
                        .map_err(|e| config_error(key, format!("{}: {e}", path.display())))
                };
                let root_cert = tls
                    .ca_file
                    .as_deref()
                    .map(|p| read("cannot read redis.tls.ca_file", p))
                    .transpose()?;
                let client_tls = match (&tls.cert_file, &tls.key_file) {
                    (Some(cert), Some(key)) => Some(ClientTlsConfig {
                        client_cert: read("cannot read redis.tls.cert_file", cert)?,
                        client_key: read("cannot read redis.tls.key_file", key)?,
                    }),
                    _ => None,
                };
                Some(TlsCertificates {
                    client_tls,
                    root_cert,
                })
            }
            None => None,
        };
        Ok(Self { password, certs })
    }

    /// A client for one server: the password file wins over a password in the URL; TCP
    /// without Nagle (replies are small and latency matters).
    fn client(&self, info: ConnectionInfo) -> RedisResult<redis::Client> {
        let mut info = info;
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        info = info.set_tcp_settings(tcp);
        // No CLIENT SETINFO on connect: Redis 7.0 has no such command (so the README's
        // least-privilege ACL line cannot grant it), and from 7.2 on a user without it
        // would fill the ACL log with refusals. (redis-rs's cluster and sentinel clients
        // cannot skip it; there the refusal is harmless and ignored.)
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        info = info.set_redis_settings(settings);
        match &self.certs {
            Some(certs) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
                redis::Client::build_with_tls(info, certs.clone())
            }
            _ => redis::Client::open(info),
        }
    }
}

/// The kind of deployment, and what it takes to open more connections to it.
pub(crate) enum Deployment {
    /// One server, and its TLS material for the lean reader.
    Single(redis::Client, Option<TlsCertificates>),
    Cluster {
        /// A template for direct connections to one node (readers).
        template: ConnectionInfo,
        secrets: Secrets,
    },
    Sentinel(Arc<SentinelState>),
}

pub(crate) struct SentinelState {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the current primary; dropped after a failure so the next command
    /// asks the sentinels again.
    current: Mutex<Option<ConnectionManager>>,
    manager_config: ConnectionManagerConfig,
    db: i64,
    /// TLS material for the lean reader's connections to the primary.
    certs: Option<TlsCertificates>,
}

impl SentinelState {
    async fn primary(&self) -> RedisResult<redis::Client> {
        self.sentinel.lock().await.async_get_client().await
    }

    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(m) = self.current.lock().expect("sentinel lock").clone() {
            return Ok(m);
        }
        let client = self.primary().await?;
        let manager = client
            .get_connection_manager_with_config(self.manager_config.clone())
            .await?;
        *self.current.lock().expect("sentinel lock") = Some(manager.clone());
        Ok(manager)
    }

    /// After a failover the old primary is gone or read-only: forget it.
    fn observe<T>(&self, result: &RedisResult<T>) {
        if let Err(e) = result
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING")))
        {
            *self.current.lock().expect("sentinel lock") = None;
        }
    }
}

/// The shared connection for short commands.
#[derive(Clone)]
pub(crate) enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelState>),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(state) => {
                let state = Arc::clone(state);
                Box::pin(async move {
                    let mut manager = state.manager().await?;
                    let result = manager.req_packed_command(cmd).await;
                    state.observe(&result);
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(state) => {
                let state = Arc::clone(state);
                Box::pin(async move {
                    let mut manager = state.manager().await?;
                    let result = manager.req_packed_commands(pipeline, offset, count).await;
                    state.observe(&result);
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(_) => 0,
            Self::Sentinel(state) => state.db,
        }
    }
}

impl Commands {
    /// MULTI/EXEC needs every key in one slot under Cluster; there, effects applied at
    /// tick time go out as a plain pipeline.
    pub(crate) fn supports_transactions(&self) -> bool {
        !matches!(self, Self::Cluster(_))
    }
}

fn infos(urls: &[String]) -> RedisResult<Vec<ConnectionInfo>> {
    urls.iter()
        .map(|u| u.as_str().into_connection_info())
        .collect()
}

/// Opens the deployment `config` describes and its shared command connection.
pub(crate) async fn open(config: &RedisConfig) -> RedisResult<(Deployment, Commands)> {
    let secrets = Secrets::load(config)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.command_timeout))
        .set_connection_timeout(Some(config.connect_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    if !config.cluster.is_empty() {
        let nodes = infos(&config.cluster)?;
        let template = nodes[0].clone();
        let mut builder = ClusterClientBuilder::new(nodes)
            .response_timeout(config.command_timeout)
            .connection_timeout(config.connect_timeout)
            .retries(3);
        if let Some(password) = &secrets.password {
            builder = builder.password(password);
        }
        if let Some(certs) = &secrets.certs {
            builder = builder.certs(certs.clone());
        }
        let commands = Commands::Cluster(builder.build()?.get_async_connection().await?);
        return Ok((Deployment::Cluster { template, secrets }, commands));
    }
    if let Some(s) = &config.sentinel {
        let nodes = infos(&s.nodes)?;
        let mut builder = SentinelClientBuilder::new(
            nodes.iter().map(|n| n.addr().clone()),
            &s.master,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(s.db);
        if let Some(password) = &secrets.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(username) = &s.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(certs) = &secrets.certs {
            builder = builder.set_client_to_redis_certificates(certs.clone());
        }
        // The sentinels' own credentials come from their URLs.
        if let Some(first) = nodes.first() {
            if let Some(password) = first.redis_settings().password() {
                builder = builder.set_client_to_sentinel_password(password);
            }
            if let Some(username) = first.redis_settings().username() {
                builder = builder.set_client_to_sentinel_username(username);
            }
        }
        let state = Arc::new(SentinelState {
            sentinel: tokio::sync::Mutex::new(builder.build()?),
            current: Mutex::new(None),
            manager_config,
            db: s.db,
            certs: secrets.certs.clone(),
        });
        state.manager().await?;
        return Ok((
            Deployment::Sentinel(state.clone()),
            Commands::Sentinel(state),
        ));
    }
    let client = secrets.client(config.url.as_str().into_connection_info()?)?;
    let commands = Commands::Single(
        client
            .get_connection_manager_with_config(manager_config)
            .await?,
    );
    Ok((Deployment::Single(client, secrets.certs), commands))
}

/// A connection of its own for one group's blocking reads, and a control connection to
/// the same server for waking it (CLIENT UNBLOCK).
#[derive(Clone)]
pub struct Reader {
    pub(crate) conn: ReadConnection,
    control: MultiplexedConnection,
    /// CLIENT ID of the reading connection.
    pub client_id: i64,
    /// How long a read may take: `block` plus `command_timeout`.
    pub(crate) response_timeout: Duration,
}

/// The lean XREADGROUP connection over TCP, TLS and Unix sockets; redis-rs only where
/// certificate checks are turned off (`rediss://…#insecure`), which redis-rs handles.
#[derive(Clone)]
pub(crate) enum ReadConnection {
    Wire(super::wire::WireReader),
    Redis(MultiplexedConnection),
}

impl Reader {
    /// Whether reads go through the lean reader (`wire.rs`) rather than redis-rs.
    pub fn is_lean(&self) -> bool {
        matches!(self.conn, ReadConnection::Wire(_))
    }

    /// Wakes a blocked read, which then returns as if its `block` had run out.
    pub async fn unblock(&self) -> RedisResult<()> {
        let _: i64 = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(self.client_id)
            .query_async(&mut self.control.clone())
            .await?;
        Ok(())
    }
}

impl Deployment {
    /// The server that owns `stream`: the one server, the Cluster node serving its slot, or
    /// the current primary.
    async fn server_for(&self, stream: &str, commands: &Commands) -> RedisResult<redis::Client> {
        match self {
            Self::Single(client, _) => Ok(client.clone()),
            Self::Sentinel(state) => state.primary().await,
            Self::Cluster {
                template, secrets, ..
            } => {
                let (host, port) = node_for(stream, commands).await?;
                let addr = match template.addr() {
                    ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: *insecure,
                        tls_params: None,
                    },
                    _ => ConnectionAddr::Tcp(host, port),
                };
                secrets.client(template.clone().set_addr(addr))
            }
        }
    }

    /// The TLS material of the deployment's connections.
    fn certs(&self) -> Option<&TlsCertificates> {
        match self {
            Self::Single(_, certs) => certs.as_ref(),
            Self::Sentinel(state) => state.certs.as_ref(),
            Self::Cluster { secrets, .. } => secrets.certs.as_ref(),
        }
    }

    /// A connection of its own to the server that owns `stream`, for a MULTI the cluster
    /// connection would not route.
    pub(crate) async fn connection_for(
        &self,
        stream: &str,
        commands: &Commands,
    ) -> RedisResult<MultiplexedConnection> {
        self.server_for(stream, commands)
            .await?
            .get_multiplexed_async_connection()
            .await
    }

    pub(crate) async fn reader(
        &self,
        stream: &str,
        commands: &Commands,
        timeouts: (Duration, Duration),
        name: &str,
    ) -> Result<Reader, super::ClientError> {
        let (connect_timeout, response_timeout) = timeouts;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(connect_timeout));
        let server = self.server_for(stream, commands).await?;
        let control = server
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let info = server.get_connection_info();
        let settings = info.redis_settings();
        let handshake = super::wire::Handshake {
            username: settings.username(),
            password: settings.password(),
            db: settings.db(),
            name,
        };
        let io = |e: std::io::Error| super::ClientError::from(RedisError::from(e));
        let timed_out = || {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        };
        let tcp = async |host: &str, port: u16| {
            let connecting = tokio::net::TcpStream::connect((host, port));
            let socket = tokio::time::timeout(connect_timeout, connecting)
                .await
                .map_err(|_| timed_out())?
                .map_err(io)?;
            socket.set_nodelay(true).map_err(io)?;
            Ok::<_, super::ClientError>(socket)
        };
        let (conn, client_id) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let socket = tcp(host, *port).await?;
                let (wire, id) = super::wire::connect(socket, handshake, connect_timeout).await?;
                (ReadConnection::Wire(wire), id)
            }
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => {
                // The same trust and client certificate as redis-rs's own TLS connections,
                // so a server they accept, this one accepts.
                let connector = tls_connector(self.certs())?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| config_error("not a TLS server name", format!("{host:?}: {e}")))?;
                let socket = tcp(host, *port).await?;
                let stream = tokio::time::timeout(connect_timeout, connector.connect(name, socket))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(io)?;
                let (wire, id) = super::wire::connect(stream, handshake, connect_timeout).await?;
                (ReadConnection::Wire(wire), id)
            }
            ConnectionAddr::Unix(path) => {
                let socket = tokio::net::UnixStream::connect(path).await.map_err(io)?;
                let (wire, id) = super::wire::connect(socket, handshake, connect_timeout).await?;
                (ReadConnection::Wire(wire), id)
            }
            _ => {
                let mut conn = server
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let id: i64 = redis::cmd("CLIENT")
                    .arg("ID")
                    .query_async(&mut conn)
                    .await?;
                let _: RedisResult<()> = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(name)
                    .query_async(&mut conn)
                    .await;
                (ReadConnection::Redis(conn), id)
            }
        };
        Ok(Reader {
            conn,
            control,
            client_id,
            response_timeout,
        })
    }
}

/// A TLS connector for the lean reader, built as redis-rs builds its own (with the `ring`
/// provider both share): the configured CA instead of the system's roots when there is
/// one, and the client certificate when there is one.
fn tls_connector(certs: Option<&TlsCertificates>) -> RedisResult<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |what: &'static str| {
        move |e: rustls::pki_types::pem::Error| config_error(what, e.to_string())
    };
    let mut roots = rustls::RootCertStore::empty();
    match certs.and_then(|c| c.root_cert.as_deref()) {
        Some(ca) => {
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(pem("cannot parse redis.tls.ca_file"))?;
                roots
                    .add(cert)
                    .map_err(|e| config_error("cannot use redis.tls.ca_file", e.to_string()))?;
            }
        }
        None => {
            // Certificates the system store holds but rustls cannot use are skipped, as
            // redis-rs skips them.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match certs.and_then(|c| c.client_tls.as_ref()) {
        Some(ClientTlsConfig {
            client_cert,
            client_key,
        }) => {
            let chain = CertificateDer::pem_slice_iter(client_cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem("cannot parse redis.tls.cert_file"))?;
            let key = PrivateKeyDer::from_pem_slice(client_key)
                .map_err(pem("cannot parse redis.tls.key_file"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| config_error("cannot use the client certificate", e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The primary serving `key`'s slot, from CLUSTER SLOTS.
async fn node_for(key: &str, commands: &Commands) -> RedisResult<(String, u16)> {
    let slot = Slot::for_key(key);
    let slots: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut commands.clone())
        .await?;
    for range in slots {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let contains = (*start..=*end).any(|s| Slot::new(s as u16) == Some(slot));
        if !contains {
            continue;
        }
        let host = match primary.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            continue;
        };
        return Ok((host, *port as u16));
    }
    Err(config_error(
        "no node serves the slot",
        format!("no primary serves the slot of {key:?} (is the cluster complete?)"),
    ))
}
