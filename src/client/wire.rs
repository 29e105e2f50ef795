//! A lean connection for the one hot command, XREADGROUP.
//!
//! Profiling the drain showed most of the daemon's CPU in redis-rs's generic RESP parser
//! and in the allocations of its `Value` tree. This connection speaks just enough RESP2
//! for a reader — the handshake (AUTH, SELECT, CLIENT SETNAME, CLIENT ID) and pipelined
//! XREADGROUPs — and parses each reply straight from the socket buffer into
//! [`RawEntry`]s: one allocation per field, nothing else. It runs over any byte stream:
//! TCP, a Unix socket, or TLS (tokio-rustls, set up in `connection.rs`). Everything else
//! goes through redis-rs.
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
    let mut buf = Vec::with_capacity(BUFFER);
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

/// The read buffer's usual size; a huge reply grows it, and it shrinks back afterwards.
const BUFFER: usize = 256 * 1024;

/// Owns the socket: writes requests in order, answers them in order.
async fn drive<S>(stream: S, mut buf: Vec<u8>, mut requests: mpsc::UnboundedReceiver<Request>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let mut waiting: VecDeque<oneshot::Sender<Reply>> = VecDeque::new();
    // Where the reply at the front of `buf` has been scanned to, so that each socket read
    // costs only its own bytes (re-parsing from the start made a big reply quadratic).
    let mut scan = Scan::default();
    let failure = 'connection: loop {
        // Answer every reply already complete in the buffer.
        while !waiting.is_empty() {
            // The usual reply arrives in one read: parse it straight away. Only one that
            // is still incomplete is scanned, so the extra pass costs a big reply, not
            // every reply. A buffer that does not end a line cannot end a reply: parsing
            // it would build entries only to drop them (with reads pipelined, replies
            // are often cut, and that waste was a tenth of the daemon's CPU).
            if scan.is_fresh()
                && buf.ends_with(b"\r\n")
                && let Ok(Some((entries, used))) = parse_read(&buf)
            {
                buf.drain(..used);
                let _ = waiting.pop_front().expect("waiting").send(Ok(entries));
                shrink(&mut buf);
                continue;
            }
            let end = match scan.advance(&buf) {
                Ok(Some(end)) => end,
                Ok(None) => break,
                Err(e) => {
                    if let Some(tx) = waiting.pop_front() {
                        let _ = tx.send(Err(e));
                    }
                    break 'connection "an unreadable reply".to_owned();
                }
            };
            // The reply is whole: parse it once. An error reply (`-NOGROUP …`) answers
            // its request; the connection goes on either way, since we know where the
            // next reply starts.
            let parsed = match parse_read(&buf[..end]) {
                Ok(Some((entries, used))) if used == end => Ok(entries),
                Ok(_) => Err(protocol("a reply that is not an XREADGROUP reply")),
                Err(e) => Err(e),
            };
            buf.drain(..end);
            let _ = waiting.pop_front().expect("waiting").send(parsed);
            shrink(&mut buf);
        }
        // A bulk string of known length is on its way: make room for it at once rather
        // than doubling the buffer as it arrives.
        if scan.needs > buf.capacity() {
            buf.reserve(scan.needs - buf.len());
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

/// Gives memory back after a huge reply: a buffer grown far past its usual size shrinks
/// once it holds little.
fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > 4 * BUFFER && buf.len() <= BUFFER {
        buf.shrink_to(BUFFER);
    }
}

/// Finds where the reply at the front of the buffer ends, without building anything, and
/// resumes where it stopped when more bytes arrive: each byte is looked at about once.
#[derive(Debug, Default)]
struct Scan {
    /// Where the next element (its header line) starts.
    at: usize,
    /// Elements still to come in each open array, innermost last.
    open: Vec<i64>,
    /// How long the buffer must be before scanning can go on (a bulk string in progress).
    needs: usize,
}

impl Scan {
    /// Nothing of the reply at the front of the buffer is known yet.
    fn is_fresh(&self) -> bool {
        self.at == 0 && self.open.is_empty()
    }

    /// The length of the complete reply at the front of `buf`, or `None` until it has
    /// arrived. After `Some`, the scan starts over for the next reply.
    fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, ClientError> {
        if buf.len() < self.needs {
            return Ok(None);
        }
        loop {
            let Some((text, next)) = line(buf, self.at) else {
                return Ok(None);
            };
            match text.first() {
                Some(b'*') => {
                    let n = int(&text[1..])?;
                    self.at = next;
                    if n > 0 {
                        self.open.push(n);
                        continue;
                    }
                }
                Some(b'$') => {
                    let n = int(&text[1..])?;
                    if n >= 0 {
                        let end = next + n as usize + 2;
                        if buf.len() < end {
                            self.needs = end;
                            return Ok(None);
                        }
                        self.at = end;
                    } else {
                        self.at = next;
                    }
                }
                Some(b'+' | b'-' | b':') => self.at = next,
                _ => {
                    return Err(protocol(format!(
                        "unexpected reply line {:?}",
                        String::from_utf8_lossy(text)
                    )));
                }
            }
            // One element is complete; so is every array it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let end = self.at;
                        *self = Self::default();
                        return Ok(Some(end));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
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

/// A RESP integer (`-12`, `0`, `512`): digits read straight from the bytes, since every
/// header and length of a reply is one (UTF-8 checking and `str::parse` were 8 % of the
/// daemon's CPU while draining).
fn int(text: &[u8]) -> Result<i64, ClientError> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let mut n: i64 = 0;
    let mut ok = !digits.is_empty();
    for &d in digits {
        let digit = i64::from(d.wrapping_sub(b'0'));
        let next = n.checked_mul(10).and_then(|n| {
            if negative {
                n.checked_sub(digit)
            } else {
                n.checked_add(digit)
            }
        });
        match next {
            Some(next) if d.is_ascii_digit() => n = next,
            _ => {
                ok = false;
                break;
            }
        }
    }
    if ok {
        Ok(n)
    } else {
        Err(protocol(format!(
            "not a number: {:?}",
            String::from_utf8_lossy(text)
        )))
    }
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
    fn integers_are_read_as_resp_writes_them_and_anything_else_is_refused() {
        for (text, want) in [
            ("0", 0),
            ("7", 7),
            ("512", 512),
            ("-1", -1),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(int(text.as_bytes()).ok(), Some(want), "{text}");
        }
        for text in [
            "",
            "-",
            "1a",
            " 1",
            "+1",
            "9223372036854775808",
            "--1",
            "1-",
        ] {
            let err = int(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("not a number"), "{text}: {err}");
        }
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

    /// Feeds `data` to a scan the way the socket does: a prefix, then more.
    fn scan_in_pieces(data: &[u8], cuts: &[usize]) -> Option<usize> {
        let mut scan = Scan::default();
        for &cut in cuts {
            if let Some(end) = scan.advance(&data[..cut]).unwrap() {
                return Some(end);
            }
        }
        scan.advance(data).unwrap()
    }

    #[test]
    fn a_scan_resumes_and_finds_where_each_reply_ends() {
        let first = reply(&[("1-0", &[("a", "x\r\ny"), ("b", "")])]);
        let mut data = first.clone();
        data.extend_from_slice(b"-NOGROUP gone\r\n*-1\r\n");
        for cut in 0..first.len() {
            let mut scan = Scan::default();
            assert_eq!(
                scan.advance(&data[..cut]).unwrap(),
                None,
                "incomplete at {cut}"
            );
            assert_eq!(
                scan.advance(&data).unwrap(),
                Some(first.len()),
                "resumed at {cut}"
            );
        }
        let rest = &data[first.len()..];
        assert_eq!(scan_in_pieces(rest, &[]), Some(15));
        assert_eq!(scan_in_pieces(&rest[15..], &[1, 3]), Some(5));
        assert!(Scan::default().advance(b"?what\r\n").is_err());
    }

    #[test]
    fn a_scan_asks_for_a_big_bulk_at_once() {
        let data = reply(&[("1-0", &[("k", &"v".repeat(10_000))])]);
        let mut scan = Scan::default();
        assert_eq!(scan.advance(&data[..100]).unwrap(), None);
        assert_eq!(scan.needs, data.len(), "the whole value, then its CRLF");
    }

    #[test]
    fn the_buffer_shrinks_after_a_huge_reply() {
        let mut buf = Vec::with_capacity(BUFFER);
        buf.resize(50 << 20, b'x');
        buf.drain(..(50 << 20) - 10);
        shrink(&mut buf);
        assert!(buf.capacity() < 2 * BUFFER, "{}", buf.capacity());
        assert_eq!(buf, vec![b'x'; 10]);
        // An ordinary buffer is left alone.
        let mut small = Vec::with_capacity(BUFFER);
        small.extend_from_slice(b"*-1\r\n");
        shrink(&mut small);
        assert_eq!(small.capacity(), BUFFER);
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        assert_eq!(
            encode(&[b"XREADGROUP", b"GROUP"]),
            b"*2\r\n$10\r\nXREADGROUP\r\n$5\r\nGROUP\r\n"
        );
    }
}

/// How long the reader takes for big replies arriving 64 KiB at a time, as over a socket:
/// `cargo test --lib wire::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;

    fn reply(entries: usize, fields: usize, value_len: usize) -> Vec<u8> {
        let value = vec![b'v'; value_len];
        let mut out = format!("*1\r\n*2\r\n$1\r\ns\r\n*{entries}\r\n").into_bytes();
        for e in 0..entries {
            let id = format!("{}-0", e + 1);
            out.extend_from_slice(
                format!("*2\r\n${}\r\n{id}\r\n*{}\r\n", id.len(), fields * 2).as_bytes(),
            );
            for f in 0..fields {
                let name = format!("f{f}");
                out.extend_from_slice(
                    format!("${}\r\n{name}\r\n${value_len}\r\n", name.len()).as_bytes(),
                );
                out.extend_from_slice(&value);
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    fn peak_rss_mb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    }

    async fn time(name: &str, data: Vec<u8>) {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(client, Vec::with_capacity(256 * 1024), rx));
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Request {
            command: encode(&[b"XREADGROUP"]),
            reply: reply_tx,
        })
        .unwrap();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for chunk in data.chunks(64 * 1024) {
                server.write_all(chunk).await.unwrap();
            }
            server
        });
        let entries = reply_rx.await.unwrap().unwrap();
        let elapsed = started.elapsed();
        let _server = writer.await.unwrap();
        println!(
            "{name}: {} entries in {elapsed:?}, peak RSS so far {} MB",
            entries.len(),
            peak_rss_mb()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn timing() {
        time("one entry, one 50 MB field", reply(1, 1, 50 * 1024 * 1024)).await;
        time("one entry, 100,000 fields", reply(1, 100_000, 10)).await;
        time("10,000 entries of 5 KB (50 MB)", reply(10_000, 1, 5 * 1024)).await;
    }
}

/// The lean parser against redis-rs's own (`redis::parse_redis_value`, then the same
/// reply-to-entries step the redis-rs read path uses) on generated XREADGROUP replies,
/// fed in pieces the way a socket delivers them.
#[cfg(test)]
mod oracle {
    use super::*;
    use proptest::prelude::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// An XREADGROUP reply: nil, or one stream with entries (nil fields for deleted ones).
    #[derive(Debug, Clone)]
    enum Shape {
        Nil,
        ServerError(String),
        Stream(Vec<u8>, Vec<(u64, u64, Option<Fields>)>),
    }

    fn bulk(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    }

    fn encode_reply(shape: &Shape) -> Vec<u8> {
        let mut out = Vec::new();
        match shape {
            Shape::Nil => out.extend_from_slice(b"*-1\r\n"),
            Shape::ServerError(e) => out.extend_from_slice(format!("-{e}\r\n").as_bytes()),
            Shape::Stream(name, entries) => {
                out.extend_from_slice(b"*1\r\n*2\r\n");
                bulk(&mut out, name);
                out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
                for (ms, seq, fields) in entries {
                    out.extend_from_slice(b"*2\r\n");
                    bulk(&mut out, format!("{ms}-{seq}").as_bytes());
                    match fields {
                        None => out.extend_from_slice(b"*-1\r\n"),
                        Some(fields) => {
                            out.extend_from_slice(format!("*{}\r\n", fields.len() * 2).as_bytes());
                            for (k, v) in fields {
                                bulk(&mut out, k);
                                bulk(&mut out, v);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Bytes of every kind: empty, CRLF inside, `$` and `*`, not UTF-8.
    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            Just(b"\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
            proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'$'), Just(b'*'), Just(0xff)],
                1..6
            ),
            "[a-z_]{1,8}".prop_map(String::into_bytes),
        ]
    }

    fn shape(max_entries: usize, max_fields: usize) -> impl Strategy<Value = Shape> {
        let fields = proptest::collection::vec((bytes(), bytes()), 0..max_fields);
        let entry = (
            any::<u64>(),
            any::<u64>(),
            proptest::option::weighted(0.9, fields),
        );
        prop_oneof![
            1 => Just(Shape::Nil),
            1 => "(NOGROUP|ERR|WRONGTYPE) [a-z ]{0,12}".prop_map(Shape::ServerError),
            8 => (bytes(), proptest::collection::vec(entry, 0..max_entries))
                .prop_map(|(name, entries)| Shape::Stream(name, entries)),
        ]
    }

    /// What the redis-rs path makes of the same bytes.
    fn oracle(data: &[u8]) -> Result<Vec<RawEntry>, String> {
        match redis::parse_redis_value(data) {
            Ok(redis::Value::ServerError(e)) => Err(format!("{e:?}")),
            Ok(value) => super::super::replies::parse_read(value).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Scans `data` fed in `pieces`, then parses the reply it found.
    fn lean(data: &[u8], cuts: &[usize]) -> Result<Vec<RawEntry>, String> {
        let mut scan = Scan::default();
        let mut end = None;
        for &cut in cuts.iter().chain([&data.len()]) {
            end = scan.advance(&data[..cut]).map_err(|e| e.to_string())?;
            if end.is_some() {
                assert_eq!(cut, data.len(), "complete before all of it arrived");
            }
        }
        let end = end.expect("complete once all of it arrived");
        assert_eq!(end, data.len(), "the reply's end");
        match parse_read(&data[..end]).map_err(|e| e.to_string())? {
            Some((entries, used)) => {
                assert_eq!(used, end);
                Ok(entries)
            }
            None => panic!("scanned complete, parsed incomplete"),
        }
    }

    fn same(data: &[u8], cuts: &[usize]) {
        same_as(&oracle(data), data, cuts);
    }

    fn same_as(expected: &Result<Vec<RawEntry>, String>, data: &[u8], cuts: &[usize]) {
        let got = lean(data, cuts);
        match (expected, &got) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => panic!("redis-rs: {expected:?}\nlean: {got:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Every split point: the reply is incomplete before, whole after, and the same
        /// as redis-rs makes of it.
        #[test]
        fn split_at_every_byte(shape in shape(4, 5)) {
            let data = encode_reply(&shape);
            let expected = oracle(&data);
            for cut in 0..=data.len() {
                same_as(&expected, &data, &[cut]);
            }
            // And byte by byte, the scan resuming each time.
            let every: Vec<usize> = (0..data.len()).collect();
            same_as(&expected, &data, &every);
        }

        /// Many entries and fields, and big values, in random pieces.
        #[test]
        fn large_replies_in_random_pieces(
            shape in shape(50, 40),
            big in proptest::option::of((0usize..3, 0usize..300_000)),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut shape = shape;
            if let (Shape::Stream(_, entries), Some((at, len))) = (&mut shape, big)
                && let Some((_, _, Some(fields))) = entries.get_mut(at)
            {
                fields.push((b"big".to_vec(), vec![b'\r'; len]));
            }
            let data = encode_reply(&shape);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len())).collect();
            cuts.sort_unstable();
            same(&data, &cuts);
        }
    }

    /// The connection task itself: pipelined replies (entries, an error, nil, a big one)
    /// arriving in pieces of every size are answered in order, as redis-rs reads them.
    #[tokio::test]
    async fn the_connection_answers_pipelined_replies_in_order_whatever_the_pieces() {
        use tokio::io::AsyncWriteExt;
        let fields = |n: usize, len: usize| -> Option<Fields> {
            Some(
                (0..n)
                    .map(|i| (format!("f{i}").into_bytes(), vec![b'\r'; len]))
                    .collect(),
            )
        };
        let replies = [
            Shape::Stream(b"s".to_vec(), vec![(1, 0, fields(3, 2)), (2, 0, None)]),
            Shape::ServerError("NOGROUP No such key".into()),
            Shape::Nil,
            Shape::Stream(
                b"s".to_vec(),
                vec![(3, 0, fields(20_000, 3)), (4, 1, fields(1, 300_000))],
            ),
            Shape::Stream(b"s".to_vec(), vec![(5, 0, fields(1, 0))]),
        ];
        let data: Vec<u8> = replies.iter().flat_map(encode_reply).collect();
        for piece in [1, 7, 4096, 1 << 20] {
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(drive(client, Vec::with_capacity(BUFFER), rx));
            let answers: Vec<_> = replies
                .iter()
                .map(|_| {
                    let (reply, answer) = oneshot::channel();
                    tx.send(Request {
                        command: encode(&[b"XREADGROUP"]),
                        reply,
                    })
                    .unwrap();
                    answer
                })
                .collect();
            let data = data.clone();
            let writer = tokio::spawn(async move {
                for chunk in data.chunks(piece) {
                    server.write_all(chunk).await.unwrap();
                }
                server
            });
            for (shape, answer) in replies.iter().zip(answers) {
                let got = answer.await.unwrap().map_err(|e| e.to_string());
                match (oracle(&encode_reply(shape)), got) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "pieces of {piece}"),
                    (Err(_), Err(e)) => assert!(e.contains("NOGROUP"), "{e}"),
                    (a, b) => panic!("pieces of {piece}: {a:?} vs {b:?}"),
                }
            }
            let _server = writer.await.unwrap();
        }
    }

    #[test]
    fn two_replies_in_one_buffer_come_apart() {
        let first = encode_reply(&Shape::Stream(
            b"s".to_vec(),
            vec![(1, 0, Some(vec![(b"k".to_vec(), b"v".to_vec())]))],
        ));
        let second = encode_reply(&Shape::Nil);
        let mut data = first.clone();
        data.extend_from_slice(&second);
        let mut scan = Scan::default();
        assert_eq!(scan.advance(&data).unwrap(), Some(first.len()));
        assert_eq!(
            scan.advance(&data[first.len()..]).unwrap(),
            Some(second.len())
        );
    }
}
