//! A real target ("backend") HTTP/1.1 server for end-to-end tests.
//!
//! One thread accepts, one thread serves each connection. Requests are read
//! with keep-alive, bodies are decoded (Content-Length or chunked) and hashed
//! while streaming, and the answer depends on the path:
//!
//! * `/ws` or `…/ws` with `Upgrade: websocket`: WebSocket echo.
//! * `/redirect?to=URL` (optionally `?code=N&to=URL`): redirect to `URL`, taken
//!   verbatim: everything after `to=` to the end of the query, so the URL may
//!   carry its own query string.
//! * `/slow?ms=N`: wait `N` ms (at most 30 s), then echo.
//! * `/status?code=N`: echo with status `N` (200..=599).
//! * `/big?bytes=N`: `N` bytes of `x` (at most 2^31).
//! * anything else: a JSON description of the request (see [`Backend`]).
//!
//! Every response carries `X-Backend: <name>`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::json;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::{Message, Role, WebSocket};

/// FNV-1a 64-bit offset basis: the initial `seed` for [`fnv1a64`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64-bit over `data`, continuing from `seed` (a previous result, or
/// [`FNV_OFFSET`] to start). Feeding pieces in order equals hashing the whole.
pub fn fnv1a64(data: &[u8], seed: u64) -> u64 {
    data.iter().fold(seed, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// Read buffer size, body piece size and write piece size.
const IO_CHUNK: usize = 64 * 1024;
/// A request head must fit in the read buffer.
const HEAD_LIMIT: usize = IO_CHUNK;
const MAX_HEADERS: usize = 512;
/// Longest chunk-size or trailer line; well below `IO_CHUNK` so a line always fits.
const LINE_LIMIT: usize = 8 * 1024;
const TRAILERS_LIMIT: usize = 64 * 1024;
const SLOW_CAP_MS: u64 = 30_000;
const BIG_CAP: u64 = 1 << 31;
/// How long `Drop` waits for the accept thread.
const STOP_BOUND: Duration = Duration::from_secs(5);

static FILLER: [u8; IO_CHUNK] = [b'x'; IO_CHUNK];

/// A target server on `127.0.0.1:<ephemeral>`, stopped on drop.
///
/// The default route answers `200` with `Content-Type: application/json`:
///
/// ```json
/// {"backend": "<name>", "method": "POST", "path": "/p?q=1", "version": "HTTP/1.1",
///  "headers": [["Host", "..."], ...], "trailers": [["X-T", "v"], ...],
///  "body_bytes": 123, "body_fnv1a64": 456}
/// ```
///
/// `path` is the request target as received; `headers` keep the received order
/// and spelling; `trailers` are those of a chunked body; the body figures are of
/// the decoded body.
pub struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

/// State shared by the handle, the accept thread and the connection threads.
struct Shared {
    name: String,
    stop: AtomicBool,
    requests: AtomicU64,
    /// Clones of the live connections, so `Drop` can shut them down.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        // A panicking connection thread must not take the registry down with it.
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Backend {
    /// Starts a target server on 127.0.0.1:0 (an ephemeral port). `name` is
    /// echoed in responses so tests can tell backends apart.
    pub fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("backend: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("backend: local address");
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("backend-{name}-accept"))
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("backend: spawn accept thread");
        Backend {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Number of requests this backend has fully received so far (head and
    /// body read; a WebSocket upgrade counts once).
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // accept() blocks; a throwaway connection wakes it up to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(handle) = self.accept_thread.take() {
            let deadline = Instant::now() + STOP_BOUND;
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        // The accept thread registers before spawning, so after it ended every
        // live connection is here: closing them ends their threads and shows
        // clients (the proxy) that this backend went away.
        for (_, stream) in self.shared.conns().drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id: u64 = 0;
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(_) => {
                // E.g. out of descriptors: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            shared.conns().insert(id, clone);
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("backend-{}-conn", shared.name))
            .spawn(move || {
                let _registration = Registration {
                    id,
                    shared: &conn_shared,
                };
                let _ = serve_connection(stream, &conn_shared);
            });
        if spawned.is_err() {
            shared.conns().remove(&id);
        }
    }
}

/// Removes a connection from the registry when its thread ends, however it ends.
struct Registration<'a> {
    id: u64,
    shared: &'a Shared,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
    }
}

/// Serves requests on one connection until it closes or errors.
fn serve_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut conn = Conn::new(stream);
    loop {
        let head = match conn.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(HeadError::Io(err)) => return Err(err),
            Err(HeadError::TooLarge) => {
                reject(conn, shared, 431, "request head too large");
                return Ok(());
            }
            Err(HeadError::Malformed) => {
                reject(conn, shared, 400, "malformed request head");
                return Ok(());
            }
        };
        if is_websocket_request(&head) {
            return serve_websocket(conn, &head, shared);
        }
        let (framing, framing_forces_close) = match body_framing(&head) {
            Ok(framing) => framing,
            Err(why) => {
                reject(conn, shared, 400, why);
                return Ok(());
            }
        };
        let close = head.wants_close() || framing_forces_close;

        let expects_body = !matches!(framing, Framing::Empty | Framing::Length(0));
        if head.version == 1 && expects_body && head.has_token("expect", "100-continue") {
            conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = match conn.read_body(&framing) {
            Ok(body) => body,
            Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                reject(conn, shared, 400, "malformed request body");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        shared.requests.fetch_add(1, Ordering::SeqCst);

        respond(&mut conn.stream, shared, &head, &body, close)?;
        if close {
            close_gracefully(conn.stream);
            return Ok(());
        }
    }
}

/// An owned, parsed request head.
struct Head {
    method: String,
    target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    version: u8,
    headers: Vec<(String, String)>,
}

impl Head {
    fn from_parsed(req: &httparse::Request<'_, '_>) -> Head {
        Head {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            version: req.version.unwrap_or(1),
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
        }
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The comma-separated list elements of all `name` headers.
    fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.values(name)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.tokens(name).any(|t| t.eq_ignore_ascii_case(token))
    }

    /// HTTP/1.1 is persistent unless told otherwise; HTTP/1.0 only if asked.
    fn wants_close(&self) -> bool {
        if self.version == 0 {
            !self.has_token("connection", "keep-alive")
        } else {
            self.has_token("connection", "close")
        }
    }

    fn version_str(&self) -> &'static str {
        if self.version == 0 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        }
    }
}

enum HeadError {
    Io(io::Error),
    TooLarge,
    Malformed,
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// The request body framing (RFC 9112 §6.3), and whether the connection must
/// close after the response because of it.
fn body_framing(head: &Head) -> Result<(Framing, bool), &'static str> {
    let has_length = head.values("content-length").next().is_some();
    let codings: Vec<&str> = head.tokens("transfer-encoding").collect();
    if !codings.is_empty() {
        if !codings
            .last()
            .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
        {
            return Err("transfer-encoding without final chunked");
        }
        // Both headers smell of smuggling: Transfer-Encoding wins, then close.
        return Ok((Framing::Chunked, has_length));
    }
    let mut length = None;
    for value in head.tokens("content-length") {
        if !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid content-length");
        }
        let n: u64 = value.parse().map_err(|_| "invalid content-length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length");
        }
        length = Some(n);
    }
    match length {
        Some(n) => Ok((Framing::Length(n), false)),
        None if has_length => Err("empty content-length"),
        None => Ok((Framing::Empty, false)),
    }
}

/// What the server saw of a decoded request body.
struct Body {
    bytes: u64,
    hash: u64,
    trailers: Vec<(String, String)>,
}

impl Body {
    fn update(&mut self, piece: &[u8]) {
        self.bytes += piece.len() as u64;
        self.hash = fnv1a64(piece, self.hash);
    }
}

/// A socket with a fixed 64 KiB read buffer: heads are parsed in place, bodies
/// pass through it piece by piece.
struct Conn {
    stream: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: vec![0; IO_CHUNK].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
    }

    /// Reads more from the socket; `Ok(0)` at end of stream. Callers never
    /// call it with a buffer full of unconsumed bytes.
    fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// The next request head, or `None` if the client closed between requests.
    fn read_head(&mut self) -> Result<Option<Head>, HeadError> {
        loop {
            if !self.buffered().is_empty() {
                let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(self.buffered()) {
                    Ok(httparse::Status::Complete(len)) => {
                        let head = Head::from_parsed(&req);
                        self.consume(len);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
                    Err(_) => return Err(HeadError::Malformed),
                }
                if self.buffered().len() >= HEAD_LIMIT {
                    return Err(HeadError::TooLarge);
                }
            }
            match self.fill() {
                Ok(0) if self.buffered().is_empty() => return Ok(None),
                Ok(0) => return Err(HeadError::Io(unexpected_eof())),
                Ok(_) => {}
                Err(err) => return Err(HeadError::Io(err)),
            }
        }
    }

    fn read_body(&mut self, framing: &Framing) -> io::Result<Body> {
        let mut body = Body {
            bytes: 0,
            hash: FNV_OFFSET,
            trailers: Vec::new(),
        };
        match framing {
            Framing::Empty => {}
            Framing::Length(n) => self.read_exact_into(*n, &mut body)?,
            Framing::Chunked => self.read_chunked(&mut body)?,
        }
        Ok(body)
    }

    /// Feeds exactly `remaining` body bytes to `body`, at most 64 KiB at a time.
    fn read_exact_into(&mut self, mut remaining: u64, body: &mut Body) -> io::Result<()> {
        while remaining > 0 {
            if self.buffered().is_empty() && self.fill()? == 0 {
                return Err(unexpected_eof());
            }
            let take = self
                .buffered()
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            body.update(&self.buffered()[..take]);
            self.consume(take);
            remaining -= take as u64;
        }
        Ok(())
    }

    /// Chunked transfer coding (RFC 9112 §7.1): size lines, data, trailers.
    fn read_chunked(&mut self, body: &mut Body) -> io::Result<()> {
        loop {
            let line = self.read_line()?;
            let size = parse_chunk_size(&line).ok_or_else(|| invalid_data("bad chunk size"))?;
            if size == 0 {
                break;
            }
            self.read_exact_into(size, body)?;
            if !self.read_line()?.is_empty() {
                return Err(invalid_data("chunk data not followed by CRLF"));
            }
        }
        let mut total = 0;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                return Ok(());
            }
            total += line.len();
            if total > TRAILERS_LIMIT {
                return Err(invalid_data("trailers too large"));
            }
            let line = String::from_utf8_lossy(&line);
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid_data("bad trailer"))?;
            body.trailers
                .push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }

    /// One line without its CRLF (a bare LF is tolerated).
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buffered().iter().position(|&b| b == b'\n') {
                let mut line = self.buffered()[..i].to_vec();
                self.consume(i + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buffered().len() >= LINE_LIMIT {
                return Err(invalid_data("line too long"));
            }
            if self.fill()? == 0 {
                return Err(unexpected_eof());
            }
        }
    }
}

/// Hex chunk size; chunk extensions (after `;`) are ignored.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

fn unexpected_eof() -> io::Error {
    io::Error::from(io::ErrorKind::UnexpectedEof)
}

fn invalid_data(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Splits a request target into path and query. Absolute-form targets
/// (`http://host/p?q`) are reduced to their path first.
fn split_target(target: &str) -> (&str, &str) {
    let origin = match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        _ => target,
    };
    origin.split_once('?').unwrap_or((origin, ""))
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        pair.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

fn is_websocket_request(head: &Head) -> bool {
    let (path, _) = split_target(&head.target);
    (path == "/ws" || path.ends_with("/ws")) && head.has_token("upgrade", "websocket")
}

/// Answers the opening handshake (RFC 6455 §4.2) and echoes messages until close.
fn serve_websocket(mut conn: Conn, head: &Head, shared: &Shared) -> io::Result<()> {
    // Strict on purpose: a proxy that drops `Connection: Upgrade` or the
    // version header should fail the test, not be papered over.
    let valid = head.method == "GET"
        && head.version == 1
        && head.has_token("connection", "upgrade")
        && head
            .values("sec-websocket-version")
            .any(|v| v.trim() == "13");
    let key = head.values("sec-websocket-key").next().map(str::trim);
    let Some(key) = key.filter(|k| valid && !k.is_empty()) else {
        reject(conn, shared, 400, "bad websocket handshake");
        return Ok(());
    };
    shared.requests.fetch_add(1, Ordering::SeqCst);

    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nX-Backend: {}\r\n",
        derive_accept_key(key.as_bytes()),
        shared.name
    );
    // Clients that offer subprotocols reject a reply choosing none.
    if let Some(protocol) = head.tokens("sec-websocket-protocol").next() {
        response.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    response.push_str("\r\n");
    conn.stream.write_all(response.as_bytes())?;

    // Frames the client sent right behind its handshake may already be buffered.
    let leftover = conn.buffered().to_vec();
    let mut ws = WebSocket::from_partially_read(conn.stream, leftover, Role::Server, None);
    loop {
        match ws.read() {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(message).is_err() {
                    return Ok(());
                }
            }
            // Pings and closes are answered by tungstenite on the next read; after
            // a close that read ends with ConnectionClosed.
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
}

/// Routes a fully received request and writes the response.
fn respond(
    stream: &mut TcpStream,
    shared: &Shared,
    head: &Head,
    body: &Body,
    close: bool,
) -> io::Result<()> {
    let (path, query) = split_target(&head.target);
    let head_only = head.method.eq_ignore_ascii_case("HEAD");
    let reply = |stream: &mut TcpStream, status: u16, headers: &[(&str, &str)], content: &[u8]| {
        send(
            stream,
            &shared.name,
            status,
            headers,
            content,
            head_only,
            close,
        )
    };
    let bad = |stream: &mut TcpStream, why: &str| {
        reply(
            stream,
            400,
            &[("Content-Type", "text/plain")],
            format!("{why}\n").as_bytes(),
        )
    };
    let echo = |stream: &mut TcpStream, status: u16| {
        let json = echo_json(&shared.name, head, body);
        reply(
            stream,
            status,
            &[("Content-Type", "application/json")],
            &json,
        )
    };

    match path {
        "/redirect" => {
            let Some(to) = redirect_target(query) else {
                return bad(stream, "redirect needs ?to=URL");
            };
            // Only look for `code` before `to=`, since the URL may have its own query.
            let before_to = &query[..query.len() - to.len()];
            let code = match query_param(before_to, "code") {
                None => Some(302),
                Some(code) => code.parse::<u16>().ok().filter(|c| (300..=399).contains(c)),
            };
            match code {
                Some(code) => reply(stream, code, &[("Location", to)], b""),
                None => bad(stream, "redirect code must be 300..=399"),
            }
        }
        "/slow" => match query_param(query, "ms").and_then(|ms| ms.parse::<u64>().ok()) {
            Some(ms) => {
                thread::sleep(Duration::from_millis(ms.min(SLOW_CAP_MS)));
                echo(stream, 200)
            }
            None => bad(stream, "slow needs ?ms=N"),
        },
        "/status" => match query_param(query, "code").and_then(|c| c.parse::<u16>().ok()) {
            Some(code) if (200..=599).contains(&code) => echo(stream, code),
            _ => bad(stream, "status needs ?code=N with N in 200..=599"),
        },
        "/big" => match query_param(query, "bytes").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => {
                let n = n.min(BIG_CAP);
                let headers = [("Content-Type", "application/octet-stream")];
                write_head(stream, &shared.name, 200, &headers, Some(n), close)?;
                if !head_only {
                    write_filler(stream, n)?;
                }
                Ok(())
            }
            None => bad(stream, "big needs ?bytes=N"),
        },
        // `/chunked?parts=N`: N chunks "part-<i>;" in chunked framing (always HTTP/1.1 framing,
        // whatever the request, as many real servers do behind a proxy).
        "/chunked" => match query_param(query, "parts").and_then(|n| n.parse::<u32>().ok()) {
            Some(parts) => {
                let headers = [
                    ("Content-Type", "text/plain"),
                    ("Transfer-Encoding", "chunked"),
                ];
                write_head(stream, &shared.name, 200, &headers, None, close)?;
                if !head_only {
                    for i in 0..parts.min(10_000) {
                        let piece = format!("part-{i};");
                        stream.write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())?;
                    }
                    stream.write_all(b"0\r\n\r\n")?;
                }
                Ok(())
            }
            None => bad(stream, "chunked needs ?parts=N"),
        },
        _ => echo(stream, 200),
    }
}

/// Everything after `to=` (the first parameter, or after `&to=`) to the end.
fn redirect_target(query: &str) -> Option<&str> {
    if let Some(rest) = query.strip_prefix("to=") {
        return Some(rest);
    }
    query.find("&to=").map(|i| &query[i + 4..])
}

fn echo_json(name: &str, head: &Head, body: &Body) -> Vec<u8> {
    let pairs = |list: &[(String, String)]| -> Vec<[String; 2]> {
        list.iter().map(|(n, v)| [n.clone(), v.clone()]).collect()
    };
    let value = json!({
        "backend": name,
        "method": head.method,
        "path": head.target,
        "version": head.version_str(),
        "headers": pairs(&head.headers),
        "trailers": pairs(&body.trailers),
        "body_bytes": body.bytes,
        "body_fnv1a64": body.hash,
    });
    // Serialising a `Value` cannot fail.
    serde_json::to_vec(&value).unwrap_or_default()
}

/// Writes a complete response whose body is in memory.
fn send(
    stream: &mut TcpStream,
    name: &str,
    status: u16,
    headers: &[(&str, &str)],
    content: &[u8],
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    // 204 and 304 never carry content (RFC 9110 §15.3.5, §15.4.5).
    let bodyless = status == 204 || status == 304;
    let length = (!bodyless).then_some(content.len() as u64);
    write_head(stream, name, status, headers, length, close)?;
    if !head_only && !bodyless {
        stream.write_all(content)?;
    }
    Ok(())
}

fn write_head(
    stream: &mut TcpStream,
    name: &str,
    status: u16,
    headers: &[(&str, &str)],
    content_length: Option<u64>,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (header, value) in headers {
        head.push_str(&format!("{header}: {value}\r\n"));
    }
    head.push_str(&format!("X-Backend: {name}\r\n"));
    if let Some(length) = content_length {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    stream.write_all(head.as_bytes())
}

fn write_filler(stream: &mut TcpStream, mut remaining: u64) -> io::Result<()> {
    while remaining > 0 {
        let piece = remaining.min(IO_CHUNK as u64) as usize;
        stream.write_all(&FILLER[..piece])?;
        remaining -= piece as u64;
    }
    Ok(())
}

/// Answers an unusable request with `status` and closes the connection.
fn reject(mut conn: Conn, shared: &Shared, status: u16, why: &str) {
    let content = format!("{why}\n");
    let headers = [("Content-Type", "text/plain")];
    let _ = send(
        &mut conn.stream,
        &shared.name,
        status,
        &headers,
        content.as_bytes(),
        false,
        true,
    );
    close_gracefully(conn.stream);
}

/// Half-closes, then drains briefly: dropping a socket with unread input makes
/// the kernel send RST, which can destroy the response before the client reads it.
fn close_gracefully(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}
