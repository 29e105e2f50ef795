//! A TCP proxy in front of Redis that can hold traffic back, so a test can decide when a
//! reply arrives (e.g. after a shutdown signal) or make a command never arrive (e.g. an
//! acknowledgement, when the process that sent it is killed meanwhile).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Proxy {
    pub addr: SocketAddr,
    hold_replies: Arc<AtomicBool>,
    hold_requests: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hold_replies = Arc::new(AtomicBool::new(false));
        let hold_requests = Arc::new(AtomicBool::new(false));
        let (replies, requests) = (hold_replies.clone(), hold_requests.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    requests.clone(),
                    true,
                );
                pump(server, client, replies.clone(), false);
            }
        });
        Self {
            addr,
            hold_replies,
            hold_requests,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// While held, replies are read from Redis but not passed on.
    pub fn hold_replies(&self, hold: bool) {
        self.hold_replies.store(hold, Ordering::SeqCst);
    }

    /// While held, commands are read from clients but not passed on; commands held when
    /// their client disconnects are discarded, never sent.
    pub fn hold_requests(&self, hold: bool) {
        self.hold_requests.store(hold, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, hold: Arc<AtomicBool>, discard_on_close: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut held: Vec<u8> = Vec::new();
        let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    0
                }
                Err(_) => break,
            };
            held.extend_from_slice(&buf[..n]);
            if hold.load(Ordering::SeqCst) || held.is_empty() {
                continue;
            }
            if to.write_all(&held).is_err() {
                break;
            }
            held.clear();
        }
        if !discard_on_close {
            // Replies held when Redis closed the connection still go out.
            while hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = to.write_all(&held);
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
