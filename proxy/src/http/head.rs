//! Request and response heads: parsed with httparse, validated against request smuggling, and
//! kept as byte ranges into one reusable buffer so that a request costs no per-header allocation.

use std::ops::Range;

/// Largest request or response head accepted (431 / 502 beyond).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed head")]
    Malformed,
    #[error("head larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADERS} fields")]
    TooLarge,
    #[error("conflicting or invalid Content-Length / Transfer-Encoding")]
    BadFraming,
    #[error("missing or invalid Host")]
    BadHost,
    #[error("unsupported request target form")]
    BadTarget,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    #[default]
    None,
    Length(u64),
    Chunked,
    /// Response bodies only: the body ends when the target closes.
    UntilClose,
}

/// Fields shared by request and response heads.
#[derive(Debug, Default)]
pub struct Fields {
    raw: Vec<u8>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// Lower-case names listed in `Connection`, which are hop-by-hop for this message.
    connection_tokens: Vec<Range<usize>>,
}

impl Fields {
    fn reset(&mut self, raw: &[u8]) {
        self.raw.clear();
        self.raw.extend_from_slice(raw);
        self.headers.clear();
        self.connection_tokens.clear();
    }

    fn range_of(&self, s: &[u8]) -> Range<usize> {
        let start = s.as_ptr() as usize - self.raw.as_ptr() as usize;
        start..start + s.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// True for headers that must not be forwarded to the next hop.
    pub fn is_hop_by_hop(&self, name: &[u8]) -> bool {
        const HOP: [&[u8]; 8] = [
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"upgrade",
            b"proxy-authenticate",
            b"proxy-authorization",
        ];
        HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || self
                .connection_tokens
                .iter()
                .any(|t| name.eq_ignore_ascii_case(&self.raw[t.clone()]))
    }

    /// Collects framing and connection facts; shared by requests and responses.
    fn scan(
        &mut self,
        parsed: &[httparse::Header<'_>],
        raw_base: &[u8],
    ) -> Result<Scan, HeadError> {
        let mut scan = Scan::default();
        for h in parsed {
            let name = self.range_of(rebase(h.name.as_bytes(), raw_base, &self.raw));
            let value = self.range_of(rebase(h.value, raw_base, &self.raw));
            let v = &self.raw[value.clone()];
            let n = h.name.as_bytes();
            if n.eq_ignore_ascii_case(b"content-length") {
                let len = parse_content_length(v).ok_or(HeadError::BadFraming)?;
                if scan.content_length.is_some_and(|prev| prev != len) {
                    return Err(HeadError::BadFraming);
                }
                scan.content_length = Some(len);
            } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
                scan.transfer_encoding = true;
                for coding in v.split(|&b| b == b',') {
                    let coding = trim(coding);
                    if coding.is_empty() {
                        continue;
                    }
                    scan.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                    scan.codings += 1;
                }
            } else if n.eq_ignore_ascii_case(b"connection") {
                for token in v.split(|&b| b == b',') {
                    let token = trim(token);
                    if token.eq_ignore_ascii_case(b"close") {
                        scan.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        scan.keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        scan.connection_upgrade = true;
                    }
                    if !token.is_empty() {
                        let r = self.range_of(token);
                        self.connection_tokens.push(r);
                    }
                }
            } else if n.eq_ignore_ascii_case(b"upgrade") {
                scan.upgrade = !trim(v).is_empty();
            } else if n.eq_ignore_ascii_case(b"host") {
                scan.hosts += 1;
                scan.host = Some(value.clone());
            } else if n.eq_ignore_ascii_case(b"expect") {
                scan.expect_continue = trim(v).eq_ignore_ascii_case(b"100-continue");
            }
            self.headers.push((name, value));
        }
        Ok(scan)
    }
}

/// httparse borrows from the caller's buffer; our copy has the same layout, so offsets carry over.
/// Some values are not in the buffer at all (httparse hands back a static `""` for a reason
/// phrase that is not UTF-8): those become empty.
fn rebase<'a>(s: &[u8], base: &[u8], copy: &'a [u8]) -> &'a [u8] {
    match (s.as_ptr() as usize).checked_sub(base.as_ptr() as usize) {
        Some(start) if start.saturating_add(s.len()) <= copy.len() => &copy[start..start + s.len()],
        _ => &copy[..0],
    }
}

#[derive(Debug, Default)]
struct Scan {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
    codings: usize,
    close: bool,
    keep_alive: bool,
    connection_upgrade: bool,
    upgrade: bool,
    hosts: usize,
    host: Option<Range<usize>>,
    expect_continue: bool,
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

// === impl RequestHead ===

/// A parsed, validated request head.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub fields: Fields,
    method: Range<usize>,
    target: Range<usize>,
    pub minor_version: u8,
    pub framing: Framing,
    /// Lower-case host without port or trailing dot.
    pub host: String,
    /// The Host header value as sent, for X-Forwarded-Host and pass_host_header.
    host_raw: Range<usize>,
    /// Path and query for the target (origin form), taken from an absolute-form target too.
    path_start: usize,
    pub keep_alive: bool,
    pub upgrade: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// Parses a head from the start of `buf`. `Ok(None)`: incomplete, read more.
    /// On success returns the head's length in bytes.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<usize>, HeadError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut storage);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() >= MAX_HEAD_BYTES {
                    Err(HeadError::TooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        };
        if len > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(HeadError::Malformed);
        };
        self.fields.reset(&buf[..len]);
        self.method = self
            .fields
            .range_of(rebase(method.as_bytes(), buf, &self.fields.raw));
        self.target = self
            .fields
            .range_of(rebase(path.as_bytes(), buf, &self.fields.raw));
        self.minor_version = version;
        let scan = self.fields.scan(req.headers, buf)?;

        // Request smuggling defences (RFC 9112 §6.1, §6.3).
        self.framing = match (scan.transfer_encoding, scan.content_length) {
            (true, Some(_)) => return Err(HeadError::BadFraming),
            (true, None) if version == 0 => return Err(HeadError::BadFraming),
            (true, None) if scan.codings == 1 && scan.chunked_last => Framing::Chunked,
            (true, None) => return Err(HeadError::BadFraming),
            (false, Some(0)) | (false, None) => Framing::None,
            (false, Some(n)) => Framing::Length(n),
        };

        let path = &self.fields.raw[self.target.clone()];
        let (authority, path_start) = split_target(path)?;
        self.path_start = self.target.start + path_start;
        let host_value = match (authority, scan.host.clone()) {
            (Some(a), _) => a.start + self.target.start..a.end + self.target.start,
            (None, Some(h)) => h,
            (None, None) if version == 0 => 0..0,
            (None, None) => return Err(HeadError::BadHost),
        };
        if scan.hosts > 1 {
            return Err(HeadError::BadHost);
        }
        self.host_raw = host_value.clone();
        self.host.clear();
        if !host_value.is_empty() {
            normalize_host(&self.fields.raw[host_value], &mut self.host)?;
        }
        self.keep_alive = if version == 0 {
            scan.keep_alive && !scan.close
        } else {
            !scan.close
        };
        self.upgrade = scan.upgrade && scan.connection_upgrade;
        self.expect_continue = scan.expect_continue && version == 1;
        Ok(Some(len))
    }

    pub fn method(&self) -> &[u8] {
        &self.fields.raw[self.method.clone()]
    }

    pub fn is_head(&self) -> bool {
        self.method() == b"HEAD"
    }

    /// Path and query in origin form (`/a/b?c`), or `*`.
    pub fn path_and_query(&self) -> &str {
        // The target came from httparse, which only accepts visible ASCII.
        std::str::from_utf8(&self.fields.raw[self.path_start..self.target.end]).unwrap_or("/")
    }

    /// Path without the query, for routing.
    pub fn path(&self) -> &str {
        let pq = self.path_and_query();
        pq.split_once('?').map_or(pq, |(p, _)| p)
    }

    pub fn host_header(&self) -> &[u8] {
        &self.fields.raw[self.host_raw.clone()]
    }
}

/// Splits a request target into an optional authority (absolute form) and the origin-form part.
fn split_target(target: &[u8]) -> Result<(Option<Range<usize>>, usize), HeadError> {
    if target.first() == Some(&b'/') || target == b"*" {
        return Ok((None, 0));
    }
    let rest_start = if target.len() >= 7 && target[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if target.len() >= 8 && target[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return Err(HeadError::BadTarget);
    };
    let rest = &target[rest_start..];
    let auth_len = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    if auth_len == 0 {
        return Err(HeadError::BadHost);
    }
    // An absolute target without a path ("http://h") has the root as path; "?q" is not valid.
    let path_start = rest_start + auth_len;
    if path_start < target.len() && target[path_start] != b'/' {
        return Err(HeadError::BadTarget);
    }
    Ok((Some(rest_start..rest_start + auth_len), path_start))
}

/// Lower-cases a Host value and removes port and trailing dot; rejects anything that is not a
/// plausible host name or IP literal.
fn normalize_host(value: &[u8], out: &mut String) -> Result<(), HeadError> {
    let value = trim(value);
    let host = if value.first() == Some(&b'[') {
        let end = value
            .iter()
            .position(|&b| b == b']')
            .ok_or(HeadError::BadHost)?;
        let after = &value[end + 1..];
        if !(after.is_empty() || valid_port(after)) {
            return Err(HeadError::BadHost);
        }
        &value[..=end]
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(i) if valid_port(&value[i..]) => &value[..i],
            Some(_) => return Err(HeadError::BadHost),
            None => value,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty()
        || host.len() > 255
        || !host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        })
    {
        return Err(HeadError::BadHost);
    }
    out.extend(host.iter().map(|b| b.to_ascii_lowercase() as char));
    Ok(())
}

/// `:` followed by 1-5 digits.
fn valid_port(s: &[u8]) -> bool {
    s.len() >= 2 && s.len() <= 6 && s[0] == b':' && s[1..].iter().all(u8::is_ascii_digit)
}

// === impl ResponseHead ===

/// A parsed response head from a target.
#[derive(Debug, Default)]
pub struct ResponseHead {
    pub fields: Fields,
    pub status: u16,
    reason: Range<usize>,
    pub minor_version: u8,
    pub framing: Framing,
    pub keep_alive: bool,
}

impl ResponseHead {
    /// Parses a head; `request_was_head` tells whether the body is absent regardless of headers.
    pub fn parse(
        &mut self,
        buf: &[u8],
        request_was_head: bool,
    ) -> Result<Option<usize>, HeadError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut storage);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() >= MAX_HEAD_BYTES {
                    Err(HeadError::TooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        };
        let (Some(code), Some(version)) = (resp.code, resp.version) else {
            return Err(HeadError::Malformed);
        };
        self.fields.reset(&buf[..len]);
        self.reason = match resp.reason {
            Some(r) => self
                .fields
                .range_of(rebase(r.as_bytes(), buf, &self.fields.raw)),
            None => 0..0,
        };
        self.status = code;
        self.minor_version = version;
        let scan = self.fields.scan(resp.headers, buf)?;
        let no_body = request_was_head || (100..200).contains(&code) || code == 204 || code == 304;
        let mut close = scan.close || (version == 0 && !scan.keep_alive);
        self.framing = if no_body {
            Framing::None
        } else if scan.transfer_encoding {
            if scan.content_length.is_some() {
                // RFC 9112 §6.3: chunked wins, and the connection must not be reused.
                close = true;
            }
            if scan.chunked_last {
                Framing::Chunked
            } else {
                close = true;
                Framing::UntilClose
            }
        } else {
            match scan.content_length {
                Some(n) => Framing::Length(n),
                None => {
                    close = true;
                    Framing::UntilClose
                }
            }
        };
        self.keep_alive = !close;
        Ok(Some(len))
    }

    pub fn reason(&self) -> &[u8] {
        &self.fields.raw[self.reason.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Option<usize>, HeadError> {
        RequestHead::default().parse(s.as_bytes())
    }

    #[test]
    fn simple_get() {
        let mut h = RequestHead::default();
        let raw = b"GET /a/b?c=1 HTTP/1.1\r\nHost: Example.COM.:8443\r\nX: y\r\n\r\nrest";
        assert_eq!(h.parse(raw).unwrap(), Some(raw.len() - 4));
        assert_eq!(h.method(), b"GET");
        assert_eq!(h.host, "example.com");
        assert_eq!(h.host_header(), b"Example.COM.:8443");
        assert_eq!(h.path(), "/a/b");
        assert_eq!(h.path_and_query(), "/a/b?c=1");
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        assert_eq!(h.fields.get("x"), Some(&b"y"[..]));
    }

    #[test]
    fn absolute_form_overrides_host() {
        let mut h = RequestHead::default();
        h.parse(b"GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n")
            .unwrap();
        assert_eq!(h.host, "a.example");
        assert_eq!(h.path_and_query(), "/x");
    }

    #[test]
    fn partial_and_too_large() {
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(req(&big), Err(HeadError::TooLarge));
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for c in cases {
            assert_eq!(req(c), Err(HeadError::BadFraming), "{c:?}");
        }
    }

    #[test]
    fn host_rules() {
        assert_eq!(req("GET / HTTP/1.1\r\n\r\n"), Err(HeadError::BadHost));
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HeadError::BadHost)
        );
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Err(HeadError::BadHost)
        );
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a:x\r\n\r\n"),
            Err(HeadError::BadHost)
        );
        assert!(req("GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        let mut h = RequestHead::default();
        h.parse(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
            .unwrap();
        assert_eq!(h.host, "[::1]");
    }

    #[test]
    fn connection_tokens_are_hop_by_hop() {
        let mut h = RequestHead::default();
        h.parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Secret, Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        assert!(h.upgrade);
        assert!(h.fields.is_hop_by_hop(b"x-secret"));
        assert!(h.fields.is_hop_by_hop(b"Keep-Alive"));
        assert!(!h.fields.is_hop_by_hop(b"accept"));
    }

    #[test]
    fn http10_keep_alive_rules() {
        let mut h = RequestHead::default();
        h.parse(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        h.parse(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn response_framing() {
        let mut r = ResponseHead::default();
        r.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false)
            .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(3), true));
        r.parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
        r.parse(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert_eq!(r.framing, Framing::None);
        r.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .unwrap();
        assert_eq!(r.framing, Framing::None);
        r.parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Chunked, false));
        assert_eq!(r.reason(), b"OK");
    }

    #[test]
    fn non_utf8_reason_phrase() {
        // Found by the request_head fuzz target: httparse returns a reason outside the buffer.
        let raw = b"HTTP/1.0 401 \xff\xe8\xffH. z\r\nContent-Length: 0\r\n\r\n";
        let mut r = ResponseHead::default();
        assert!(r.parse(raw, false).unwrap().is_some());
        assert_eq!(r.status, 401);
        let crash: &[u8] = &[
            10, 10, 72, 84, 84, 80, 47, 49, 46, 48, 32, 52, 48, 49, 32, 255, 232, 255, 72, 46, 32,
            122, 32, 72, 84, 84, 80, 47, 49, 46, 48, 10, 84, 58, 255, 255, 46, 32, 9, 10, 72, 84,
            84, 50, 58, 255, 255, 46, 10, 13, 10, 13, 10, 13, 0, 0, 0, 0, 0, 0, 255, 255, 255, 10,
            48, 0, 0, 32, 9, 10, 10,
        ];
        let _ = r.parse(crash, false);
        let _ = r.parse(crash, true);
    }

    #[test]
    fn garbage_never_panics() {
        let seedtext = b"GET /x HTTP/1.1\r\nHost: a.b:1\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\nConnection: close, x\r\n\r\n";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut h = RequestHead::default();
        let mut r = ResponseHead::default();
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 160)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    if seed.is_multiple_of(7) {
                        seed as u8
                    } else {
                        seedtext[(seed as usize >> 8) % seedtext.len()]
                    }
                })
                .collect();
            let _ = h.parse(&bytes);
            let _ = r.parse(&bytes, false);
        }
    }
}
