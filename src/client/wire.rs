//! A lean connection for the one hot command, XREADGROUP.
//!
//! Profiling the drain showed most of the daemon's CPU in redis-rs's generic RESP parser
//! and in the allocations of its `Value` tree. This connection speaks just enough RESP2
//! for a reader — the handshake (AUTH, SELECT, CLIENT SETNAME, CLIENT ID) and pipelined
//! XREADGROUPs — and parses each reply straight from the socket buffer into
//! [`RawEntry`]s: one allocation per field, nothing else. Everything else (and TLS, which
//! keeps the redis-rs reader) goes through redis-rs.
//!
//! One task owns the socket: it writes requests as they come and answers them in order as
//! their replies complete, so several reads can be in flight.

use std::collections::VecDeque;
use std::time::Duration;

use streamworker_handlers::EntryId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::{ClientError, RawEntry};

type Reply = Result<Vec<RawEntry>, ClientError>;

struct Request {
    command: Vec<u8>,
    reply: oneshot::Sender<Reply>,
}

/// A reader connection on the lean path.
#[derive(Clone)]
pub struct WireReader {
    requests: mpsc::UnboundedSender<Request>,
}

fn io_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Unavailable(redis::RedisError::from((
        redis::ErrorKind::Io,
        "connection",
        e.to_string(),
    )))
}

fn protocol(detail: impl Into<String>) -> ClientError {
    ClientError::Protocol {
        command: "XREADGROUP",
        detail: detail.into(),
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What the handshake needs.
pub struct Handshake<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub db: i64,
    pub name: &'a str,
}

/// Connects over `stream` (TCP or Unix), runs the handshake, and returns the reader and
/// its CLIENT ID.
pub async fn connect<S>(
    mut stream: S,
    handshake: Handshake<'_>,
    timeout: Duration,
) -> Result<(WireReader, i64), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = Vec::with_capacity(256 * 1024);
    let simple =
        async |stream: &mut S, buf: &mut Vec<u8>, args: &[&[u8]]| -> Result<Simple, ClientError> {
            stream.write_all(&encode(args)).await.map_err(io_error)?;
            loop {
                if let Some((value, used)) = parse_simple(buf)? {
                    buf.drain(..used);
                    return Ok(value);
                }
                let n = stream.read_buf(buf).await.map_err(io_error)?;
                if n == 0 {
                    return Err(io_error("connection closed during the handshake"));
                }
            }
        };
    let handshake = async {
        if let Some(password) = handshake.password {
            let reply = match handshake.username {
                Some(user) => {
                    simple(
                        &mut stream,
                        &mut buf,
                        &[b"AUTH", user.as_bytes(), password.as_bytes()],
                    )
                    .await?
                }
                None => simple(&mut stream, &mut buf, &[b"AUTH", password.as_bytes()]).await?,
            };
            reply.ok()?;
        }
        if handshake.db != 0 {
            simple(
                &mut stream,
                &mut buf,
                &[b"SELECT", handshake.db.to_string().as_bytes()],
            )
            .await?
            .ok()?;
        }
        // Shows in CLIENT LIST which group and consumer the connection reads for.
        let _ = simple(
            &mut stream,
            &mut buf,
            &[b"CLIENT", b"SETNAME", handshake.name.as_bytes()],
        )
        .await?;
        match simple(&mut stream, &mut buf, &[b"CLIENT", b"ID"]).await? {
            Simple::Int(id) => Ok(id),
            other => Err(protocol(format!("CLIENT ID answered {other:?}"))),
        }
    };
    let client_id = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| io_error("the handshake timed out"))??;
    let (requests, rx) = mpsc::unbounded_channel();
    tokio::spawn(drive(stream, buf, rx));
    Ok((WireReader { requests }, client_id))
}

impl WireReader {
    /// Sends an XREADGROUP and waits for its parsed reply.
    pub async fn read(&self, command: Vec<u8>) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request { command, reply: tx })
            .map_err(|_| io_error("the read connection is closed"))?;
        rx.await
            .map_err(|_| io_error("the read connection closed"))?
    }
}

/// Owns the socket: writes requests in order, answers them in order.
async fn drive<S>(stream: S, mut buf: Vec<u8>, mut requests: mpsc::UnboundedReceiver<Request>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let mut waiting: VecDeque<oneshot::Sender<Reply>> = VecDeque::new();
    let failure = 'connection: loop {
        // Answer every reply already complete in the buffer.
        while !waiting.is_empty() {
            match parse_read(&buf) {
                Ok(Some((entries, used))) => {
                    buf.drain(..used);
                    let _ = waiting.pop_front().expect("waiting").send(Ok(entries));
                }
                Ok(None) => break,
                Err(e) => {
                    // An error reply is one complete line: answer it and go on. A reply we
                    // cannot parse leaves the stream unusable.
                    let line_end = line(&buf, 0).map(|(_, next)| next);
                    let is_error_reply = buf.first() == Some(&b'-');
                    if let Some(tx) = waiting.pop_front() {
                        let _ = tx.send(Err(e));
                    }
                    match line_end {
                        Some(next) if is_error_reply => {
                            buf.drain(..next);
                        }
                        _ => break 'connection "an unreadable reply".to_owned(),
                    }
                }
            }
        }

        tokio::select! {
            request = requests.recv() => match request {
                Some(Request { command, reply }) => {
                    if let Err(e) = write.write_all(&command).await {
                        let _ = reply.send(Err(io_error(&e)));
                        break e.to_string();
                    }
                    waiting.push_back(reply);
                }
                None => return,
            },
            n = read.read_buf(&mut buf), if !waiting.is_empty() => match n {
                Ok(0) => break "the server closed the connection".to_owned(),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            },
        }
    };
    for tx in waiting.drain(..) {
        let _ = tx.send(Err(io_error(&failure)));
    }
}

/// A handshake reply.
#[derive(Debug)]
enum Simple {
    Ok,
    Int(i64),
    Error(String),
    Other,
}

impl Simple {
    fn ok(self) -> Result<(), ClientError> {
        match self {
            Self::Error(e) => Err(ClientError::Command(redis::RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "the handshake was refused",
                e,
            )))),
            _ => Ok(()),
        }
    }
}

/// Finds `\r\n` from `at`; returns the line without it and the position after it.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rel = memchr_crlf(&buf[at..])?;
    Some((&buf[at..at + rel], at + rel + 2))
}

fn memchr_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\r') {
        let i = from + i;
        if buf.get(i + 1) == Some(&b'\n') {
            return Some(i);
        }
        if i + 1 >= buf.len() {
            return None;
        }
        from = i + 1;
    }
    None
}

fn int(text: &[u8]) -> Result<i64, ClientError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| protocol(format!("not a number: {:?}", String::from_utf8_lossy(text))))
}

fn parse_simple(buf: &[u8]) -> Result<Option<(Simple, usize)>, ClientError> {
    let Some((first, next)) = line(buf, 0) else {
        return Ok(None);
    };
    let value = match first.first() {
        Some(b'+') if first == b"+OK" => Simple::Ok,
        Some(b'+') => Simple::Other,
        Some(b':') => Simple::Int(int(&first[1..])?),
        Some(b'-') => Simple::Error(String::from_utf8_lossy(&first[1..]).into_owned()),
        Some(b'$') => {
            let len = int(&first[1..])?;
            if len < 0 {
                Simple::Other
            } else {
                let end = next + len as usize + 2;
                if buf.len() < end {
                    return Ok(None);
                }
                return Ok(Some((Simple::Other, end)));
            }
        }
        _ => {
            return Err(protocol(format!(
                "unexpected handshake reply {:?}",
                String::from_utf8_lossy(first)
            )));
        }
    };
    Ok(Some((value, next)))
}

/// A cursor over a RESP2 reply that may not have arrived completely: every step returns
/// `Ok(None)` when it runs out of bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn header(&mut self, kind: u8) -> Result<Option<i64>, ClientError> {
        let Some((text, next)) = line(self.buf, self.at) else {
            return Ok(None);
        };
        match text.first() {
            Some(&k) if k == kind => {
                self.at = next;
                Ok(Some(int(&text[1..])?))
            }
            Some(b'-') => Err(ClientError::from(server_error(text))),
            _ => Err(protocol(format!(
                "expected {:?}, got {:?}",
                kind as char,
                String::from_utf8_lossy(text)
            ))),
        }
    }

    fn bulk(&mut self) -> Result<Option<Option<&'a [u8]>>, ClientError> {
        let start = self.at;
        let Some(len) = self.header(b'$')? else {
            return Ok(None);
        };
        if len < 0 {
            return Ok(Some(None));
        }
        let end = self.at + len as usize;
        if self.buf.len() < end + 2 {
            self.at = start;
            return Ok(None);
        }
        let value = &self.buf[self.at..end];
        self.at = end + 2;
        Ok(Some(Some(value)))
    }
}

/// Turns a RESP error line (`-NOGROUP …`) into the RedisError redis-rs would have
/// produced, so codes such as NOGROUP classify the same way.
fn server_error(line: &[u8]) -> redis::RedisError {
    let mut raw = line.to_vec();
    raw.extend_from_slice(b"\r\n");
    match redis::parse_redis_value(&raw) {
        Ok(redis::Value::ServerError(e)) => e.into(),
        Ok(other) => redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected error reply",
            format!("{other:?}"),
        )),
        Err(e) => e,
    }
}

macro_rules! need {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

/// Parses one complete XREADGROUP reply from the front of `buf`: the entries and how many
/// bytes it took, or `None` when the reply has not fully arrived.
pub fn parse_read(buf: &[u8]) -> Result<Option<(Vec<RawEntry>, usize)>, ClientError> {
    let mut c = Cursor { buf, at: 0 };
    let streams = need!(c.header(b'*'));
    if streams <= 0 {
        return Ok(Some((Vec::new(), c.at)));
    }
    let mut out = Vec::new();
    for _ in 0..streams {
        if need!(c.header(b'*')) != 2 {
            return Err(protocol("a stream reply is not [name, entries]"));
        }
        need!(c.bulk());
        let count = need!(c.header(b'*'));
        out.reserve(count.max(0) as usize);
        for _ in 0..count.max(0) {
            let parts = need!(c.header(b'*'));
            if parts != 2 {
                return Err(protocol("an entry is not [id, fields]"));
            }
            let id_bytes = need!(c.bulk()).ok_or_else(|| protocol("nil entry id"))?;
            let id = EntryId::parse(id_bytes).ok_or_else(|| {
                protocol(format!("bad id {:?}", String::from_utf8_lossy(id_bytes)))
            })?;
            // A history read answers deleted entries with nil fields.
            let Some(n) = need!(fields_header(&mut c)) else {
                out.push(RawEntry {
                    id,
                    delivery_count: 1,
                    fields: Vec::new(),
                });
                continue;
            };
            let mut fields = Vec::with_capacity((n / 2) as usize);
            for _ in 0..n / 2 {
                let k = need!(c.bulk()).unwrap_or_default().to_vec();
                let v = need!(c.bulk()).unwrap_or_default().to_vec();
                fields.push((k, v));
            }
            out.push(RawEntry {
                id,
                delivery_count: 1,
                fields,
            });
        }
    }
    Ok(Some((out, c.at)))
}

/// `*<n>` or `*-1` (nil fields).
fn fields_header(c: &mut Cursor<'_>) -> Result<Option<Option<i64>>, ClientError> {
    let n = match c.header(b'*')? {
        Some(n) => n,
        None => return Ok(None),
    };
    Ok(Some((n >= 0).then_some(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(entries: &[(&str, &[(&str, &str)])]) -> Vec<u8> {
        let mut out = b"*1\r\n*2\r\n$6\r\norders\r\n".to_vec();
        out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
        for (id, fields) in entries {
            out.extend_from_slice(
                format!("*2\r\n${}\r\n{id}\r\n*{}\r\n", id.len(), fields.len() * 2).as_bytes(),
            );
            for (k, v) in *fields {
                out.extend_from_slice(
                    format!("${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len()).as_bytes(),
                );
            }
        }
        out
    }

    #[test]
    fn parses_a_reply_and_waits_for_the_rest() {
        let data = reply(&[
            ("1-0", &[("a", "x\r\ny"), ("b", "")]),
            ("2-5", &[("k", "v")]),
        ]);
        for cut in 0..data.len() {
            assert!(
                parse_read(&data[..cut]).unwrap().is_none(),
                "incomplete at {cut}"
            );
        }
        let mut two = data.clone();
        two.extend_from_slice(b"*-1\r\n");
        let (entries, used) = parse_read(&two).unwrap().unwrap();
        assert_eq!(used, data.len());
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, EntryId::new(1, 0));
        assert_eq!(
            entries[0].fields,
            vec![
                (b"a".to_vec(), b"x\r\ny".to_vec()),
                (b"b".to_vec(), Vec::new())
            ]
        );
        assert_eq!(entries[1].fields, vec![(b"k".to_vec(), b"v".to_vec())]);
        let (none, used) = parse_read(&two[data.len()..]).unwrap().unwrap();
        assert!(none.is_empty());
        assert_eq!(used, 5);
    }

    #[test]
    fn errors_classify_like_redis_rs() {
        let err = parse_read(b"-NOGROUP No such key 'x' or consumer group 'g'\r\n").unwrap_err();
        assert!(matches!(err, ClientError::NoGroup(_)), "{err:?}");
        let err = parse_read(b"+OK\r\n").unwrap_err();
        assert!(matches!(err, ClientError::Protocol { .. }));
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        assert_eq!(
            encode(&[b"XREADGROUP", b"GROUP"]),
            b"*2\r\n$10\r\nXREADGROUP\r\n$5\r\nGROUP\r\n"
        );
    }
}
