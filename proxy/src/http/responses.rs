//! Responses the proxy writes itself: error pages and redirects. Pages name no internals.

use std::io::Write;

/// The statuses the proxy answers on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyStatus {
    BadRequest,
    Forbidden,
    NotFound,
    RequestTimeout,
    HeadersTooLarge,
    BadGateway,
    GatewayTimeout,
    ServiceUnavailable,
    MethodNotAllowed,
}

impl ProxyStatus {
    pub fn code(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::HeadersTooLarge => 431,
            Self::BadGateway => 502,
            Self::ServiceUnavailable => 503,
            Self::GatewayTimeout => 504,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad Request",
            Self::NotFound => "Not Found",
            Self::Forbidden => "Forbidden",
            Self::MethodNotAllowed => "Method Not Allowed",
            Self::RequestTimeout => "Request Timeout",
            Self::HeadersTooLarge => "Request Header Fields Too Large",
            Self::BadGateway => "Bad Gateway",
            Self::ServiceUnavailable => "Service Unavailable",
            Self::GatewayTimeout => "Gateway Timeout",
        }
    }

    fn explanation(self) -> &'static str {
        match self {
            Self::BadRequest => "The request could not be understood.",
            Self::Forbidden => "This service does not accept requests from your address.",
            Self::NotFound => "No service is published at this address.",
            Self::MethodNotAllowed => "This method is not supported here.",
            Self::RequestTimeout => "The request took too long to arrive.",
            Self::HeadersTooLarge => "The request headers are too large.",
            Self::BadGateway => "The service's target is unreachable or answered badly.",
            Self::ServiceUnavailable => "The proxy is shutting down. Please retry.",
            Self::GatewayTimeout => "The service's target did not answer in time.",
        }
    }
}

/// Writes a complete error response into `out`. The connection is closed after it when `close`.
pub fn error_page(out: &mut Vec<u8>, status: ProxyStatus, close: bool, head_only: bool) {
    let code = status.code();
    let reason = status.reason();
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{code} {reason}</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem\">\
         <h1>{code} {reason}</h1><p>{}</p></body></html>\n",
        status.explanation()
    );
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: {}\r\n\r\n",
        body.len(),
        if close { "close" } else { "keep-alive" },
    );
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

/// A redirect to `location` (already a valid URL); 301 for GET/HEAD, 308 otherwise so that the
/// method and body are kept.
pub fn redirect(out: &mut Vec<u8>, location: &str, safe_method: bool) {
    let (code, reason) = if safe_method {
        (301, "Moved Permanently")
    } else {
        (308, "Permanent Redirect")
    };
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// The answer to an ACME http-01 validation: the key authorization, or a 404 page for a token
/// nobody is solving. The connection closes after it.
pub fn acme_challenge(out: &mut Vec<u8>, key_authorization: Option<&str>, head_only: bool) {
    let Some(body) = key_authorization else {
        return error_page(out, ProxyStatus::NotFound, true, head_only);
    };
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response the proxy writes itself for the authentication gate: any status, extra headers,
/// a body; `Connection` and `Content-Length` are added when it is written.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub content_type: &'static str,
    pub body: String,
}

impl Page {
    pub fn html(status: u16, body: String) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: "text/html; charset=utf-8",
            body,
        }
    }

    pub fn plain(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
        }
    }

    pub fn with(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401 for API clients: no page, a challenge naming the realm.
    pub fn unauthorized(realm: &str) -> Self {
        let realm: String = realm.chars().filter(|c| *c != '"' && *c != '\\').collect();
        Self::plain(401, "Authentication required.\n")
            .with("WWW-Authenticate", format!("Bearer realm=\"{realm}\""))
    }

    pub fn too_many(retry_after: std::time::Duration) -> Self {
        let secs = retry_after.as_secs().max(1);
        Self::plain(
            429,
            &format!("Too many failed attempts. Retry in {secs} seconds.\n"),
        )
        .with("Retry-After", secs.to_string())
    }

    /// A redirect without a body (302 Found, 303 See Other).
    pub fn redirect(status: u16, location: &str) -> Self {
        Self {
            status,
            headers: vec![("Location", location.to_string())],
            content_type: "text/plain; charset=utf-8",
            body: String::new(),
        }
    }

    pub fn write(&self, out: &mut Vec<u8>, keep_alive: bool, head_only: bool) {
        out.clear();
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        let _ = write!(
            out,
            "Connection: {}\r\n\r\n",
            if keep_alive { "keep-alive" } else { "close" }
        );
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_length_and_no_internals() {
        let mut out = Vec::new();
        error_page(&mut out, ProxyStatus::BadGateway, true, false);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: close"));
        assert!(!body.contains("127.0.0.1"));
    }

    #[test]
    fn gate_pages_carry_their_headers() {
        let mut out = Vec::new();
        Page::too_many(std::time::Duration::from_secs(30)).write(&mut out, true, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(text.contains("Retry-After: 30\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n"));
        let mut out = Vec::new();
        Page::unauthorized("a\"b.example").write(&mut out, false, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("WWW-Authenticate: Bearer realm=\"ab.example\"\r\n"));
    }

    #[test]
    fn head_only_keeps_length() {
        let mut out = Vec::new();
        error_page(&mut out, ProxyStatus::NotFound, false, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("\r\n\r\n"));
        assert!(!text.contains("Content-Length: 0"));
    }
}
