//! `streamworker healthcheck`: one GET of `/livez` (or `/readyz`) on the daemon's own
//! listener, for the container image's HEALTHCHECK and exec probes.
//!
//! The image's final stage has no shell, curl or wget, so the check is the binary itself.
//! It speaks just enough HTTP/1.0 over a std `TcpStream` (no runtime, no client crate):
//! the request is fixed, the reply is read to EOF (HTTP/1.0 closes after the response)
//! and only the status line decides. Every step has a deadline, so a hung daemon makes
//! the check fail rather than hang past Docker's own timeout.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Which endpoint to ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/livez`: every group's loop keeps turning (200 even while Redis is down).
    Live,
    /// `/readyz`: Redis reachable, every group running, not shutting down.
    Ready,
}

impl Probe {
    pub fn path(self) -> &'static str {
        match self {
            Probe::Live => "/livez",
            Probe::Ready => "/readyz",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error(
        "http.listen is empty, so the daemon serves no /livez or /readyz: set http.listen (e.g. \"0.0.0.0:9464\") or pass --addr host:port"
    )]
    NoListener,
    #[error("cannot resolve `{listen}`: {source}; give host:port, e.g. 127.0.0.1:9464")]
    Resolve {
        listen: String,
        source: std::io::Error,
    },
    #[error(
        "`{0}` has port 0 (the daemon picks a port at start, which a health check cannot know): set a fixed port in http.listen or pass --addr host:port"
    )]
    PortZero(String),
    #[error(
        "cannot connect to {addr}: {source} (is `streamworker run` running with this configuration?)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("GET {path} on {addr}: {source}")]
    Io {
        path: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "GET {path} on {addr}: no answer within {timeout:?}; raise --timeout if the host is loaded"
    )]
    Timeout {
        path: &'static str,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("GET {path} on {addr}: the reply is not HTTP: {head:?}")]
    NotHttp {
        path: &'static str,
        addr: SocketAddr,
        head: String,
    },
    #[error("GET {path} on {addr} answered {status}: {body}")]
    Unhealthy {
        path: &'static str,
        addr: SocketAddr,
        status: u16,
        body: String,
    },
}

/// The address to ask for a daemon that listens on `listen` (`http.listen`): the same
/// port, and the loopback address when the daemon listens on every interface (`0.0.0.0`,
/// `[::]`), since the check runs in the daemon's own network namespace.
pub fn target(listen: &str) -> Result<SocketAddr, HealthcheckError> {
    if listen.trim().is_empty() {
        return Err(HealthcheckError::NoListener);
    }
    let addr = listen
        .to_socket_addrs()
        .map_err(|source| HealthcheckError::Resolve {
            listen: listen.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| HealthcheckError::Resolve {
            listen: listen.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    if addr.port() == 0 {
        return Err(HealthcheckError::PortZero(listen.to_owned()));
    }
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, addr.port()))
}

/// GETs `probe`'s path on `addr`; `Ok` with the body when the status is 200, within
/// `timeout` overall.
pub fn probe(
    addr: SocketAddr,
    probe: Probe,
    timeout: Duration,
) -> Result<String, HealthcheckError> {
    let path = probe.path();
    let deadline = Instant::now() + timeout;
    let timed_out = || HealthcheckError::Timeout {
        path,
        addr,
        timeout,
    };
    let io = |source: std::io::Error| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else {
            HealthcheckError::Io { path, addr, source }
        }
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| HealthcheckError::Connect { addr, source })?;
    let remaining = |deadline: Instant| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    stream
        .set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))
        .map_err(io)?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(io)?;

    // HTTP/1.0: the server closes the connection after the response, so EOF ends it.
    // The replies are a few hundred bytes; cap what is kept so a wrong port serving
    // something large cannot make the check grow without bound.
    const KEEP: usize = 64 * 1024;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))
            .map_err(io)?;
        match stream.read(&mut buf).map_err(io)? {
            0 => break,
            n if reply.len() < KEEP => reply.extend_from_slice(&buf[..n]),
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| HealthcheckError::NotHttp {
            path,
            addr,
            head: status_line.chars().take(80).collect(),
        })?;
    let body = body.trim().to_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(HealthcheckError::Unhealthy {
            path,
            addr,
            status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_interface_is_asked_on_loopback_and_a_host_stays_itself() {
        assert_eq!(
            target("0.0.0.0:9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(target("[::]:9464").unwrap(), "[::1]:9464".parse().unwrap());
        assert_eq!(
            target("10.1.2.3:80").unwrap(),
            "10.1.2.3:80".parse().unwrap()
        );
        assert!(matches!(target(""), Err(HealthcheckError::NoListener)));
        assert!(matches!(
            target("127.0.0.1:0"),
            Err(HealthcheckError::PortZero(_))
        ));
        assert!(matches!(
            target("no-port-here"),
            Err(HealthcheckError::Resolve { .. })
        ));
    }
}
