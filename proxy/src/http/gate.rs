//! The authentication gate in front of a protected service: a valid session cookie passes
//! (verified locally, no management call), a configured header is checked with management,
//! the login forms post to [`LOGIN_PATH`], SSO goes through management's identity provider,
//! and everything else gets the login page (browsers) or a 401 (API clients).
//! Failed credentials are limited per client address and service (429 + `Retry-After`).

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use proto::session::{COOKIE_NAME, SessionClaims};
use proto::{AuthenticateRequest, authenticate_request};

use super::connection::{ClientScheme, Conn};
use super::head::Framing;
use super::responses::Page;
use crate::auth::{cookies, csrf, form, login_page};
use crate::control::auth_calls::AuthCallError;
use crate::dataplane::WorkerCtx;
use crate::routes::Service;
use crate::routes::auth::ServiceAuth;

/// Paths the gate answers itself on protected services.
pub const RESERVED_PREFIX: &str = "/__portcullis__/";
/// Where the login forms post.
pub const LOGIN_PATH: &str = "/__portcullis__/login";
/// Starts single sign-on: asks management where to send the browser.
pub const SSO_PATH: &str = "/__portcullis__/sso";
/// How long an accepted header value is trusted without asking management again: a value
/// changed or removed there stops working within this time.
const HEADER_MEMORY_SECS: i64 = 60;
/// Largest login form body read.
const MAX_FORM: u64 = 8 * 1024;

/// Who the request was authenticated as, for the target's identity headers and the access log.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub user_id: String,
    /// `X-NetBird-User`: the email when known, else the user id.
    pub user: String,
    /// `X-NetBird-Groups`: group names, comma separated.
    pub groups: String,
    pub method: String,
}

impl Identity {
    /// `X-NetBird-User` is the email when there is one, else the user id.
    pub fn new(user_id: &str, email: &str, group_names: &[String], method: &str) -> Self {
        Self {
            user_id: user_id.to_string(),
            user: if email.is_empty() { user_id } else { email }.to_string(),
            groups: group_names.join(","),
            method: method.to_string(),
        }
    }

    pub fn from_claims(c: &SessionClaims) -> Self {
        let names = if c.group_names.is_empty() {
            &c.groups
        } else {
            &c.group_names
        };
        Self::new(&c.sub, &c.email, names, &c.method)
    }
}

/// What the gate decided.
pub enum Verdict {
    /// Forward the request as this identity.
    Pass(Rc<Identity>),
    /// The gate answered itself with this status; the connection continues when `keep_alive`.
    Answered { status: u16, keep_alive: bool },
}

/// Facts the access log wants from the gate, even when it answered itself.
#[derive(Debug, Default)]
pub struct GateLog {
    pub method: String,
    pub user_id: String,
    pub success: bool,
}

pub async fn check<S: AsyncReadRent + AsyncWriteRent>(
    client: &mut S,
    conn: &mut Conn,
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    auth: &ServiceAuth,
    client_ip: IpAddr,
    log: &mut GateLog,
) -> Verdict {
    let now = unix_now();
    if let Some(identity) = session_from_cookie(conn, ctx, service, auth, now) {
        log.success = true;
        return Verdict::Pass(identity);
    }
    let reply = decide(client, conn, ctx, service, auth, client_ip, log, now).await;
    match reply {
        Reply::Pass(identity) => Verdict::Pass(Rc::new(identity)),
        Reply::Send(page) => {
            let keep_alive = conn.head.keep_alive && conn.head.framing == Framing::None;
            page.write(&mut conn.out, keep_alive, conn.head.is_head());
            send(client, conn).await;
            Verdict::Answered {
                status: page.status,
                keep_alive,
            }
        }
    }
}

enum Reply {
    Pass(Identity),
    Send(Page),
}

#[allow(clippy::too_many_arguments)]
async fn decide<S: AsyncReadRent + AsyncWriteRent>(
    client: &mut S,
    conn: &mut Conn,
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    auth: &ServiceAuth,
    client_ip: IpAddr,
    log: &mut GateLog,
    now: i64,
) -> Reply {
    let path = conn.head.path().to_string();
    let is_post = conn.head.method() == b"POST";
    if path == LOGIN_PATH && is_post && (auth.password || auth.pin) {
        return login(client, conn, ctx, service, auth, client_ip, log, now).await;
    }
    if path == SSO_PATH && auth.oidc {
        let return_to = query_param(conn.head.path_and_query(), "return_to")
            .map(|r| safe_return_to(&r))
            .unwrap_or_else(|| "/".to_string());
        return start_sso(conn, ctx, service, &return_to).await;
    }
    if auth.oidc
        && let Some(token) = query_param(conn.head.path_and_query(), "session_token")
    {
        return finish_sso(conn, ctx, service, auth, &token, log).await;
    }
    for name in &auth.headers {
        let Some(value) = conn.head.fields.get(name) else {
            continue;
        };
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        log.method = "header".into();
        return header_auth(ctx, service, auth, client_ip, name, value, log, now).await;
    }
    if !wants_html(conn) {
        return Reply::Send(Page::unauthorized(&service.domain));
    }
    if auth.oidc && !auth.password && !auth.pin {
        return start_sso(
            conn,
            ctx,
            service,
            &safe_return_to(conn.head.path_and_query()),
        )
        .await;
    }
    let return_to = safe_return_to(conn.head.path_and_query());
    login_form(conn, service, auth, None, 401, &return_to)
}

/// The login page with a fresh CSRF nonce in its forms and cookie.
fn login_form(
    conn: &Conn,
    service: &Service,
    auth: &ServiceAuth,
    error: Option<&str>,
    status: u16,
    return_to: &str,
) -> Reply {
    let nonce = csrf::new_nonce();
    let sso_url = auth
        .oidc
        .then(|| format!("{SSO_PATH}?return_to={}", percent_encode(return_to)));
    let page = login_page::render(&login_page::LoginPage {
        domain: &service.domain,
        password: auth.password,
        pin: auth.pin,
        sso_url: sso_url.as_deref(),
        error,
        csrf: &nonce,
        return_to,
        action: LOGIN_PATH,
    });
    let cookie = csrf::set_cookie_header(&nonce, conn.scheme == ClientScheme::Https);
    Reply::Send(Page::html(status, page).with("Set-Cookie", cookie))
}

#[allow(clippy::too_many_arguments)]
async fn login<S: AsyncReadRent + AsyncWriteRent>(
    client: &mut S,
    conn: &mut Conn,
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    auth: &ServiceAuth,
    client_ip: IpAddr,
    log: &mut GateLog,
    now: i64,
) -> Reply {
    let body = match read_form_body(client, conn, ctx).await {
        Ok(b) => b,
        Err(status) => {
            return Reply::Send(Page::plain(status, "The login form could not be read.\n"));
        }
    };
    let Ok(fields) = form::parse(&body) else {
        return login_form(
            conn,
            service,
            auth,
            Some("The form was not understood."),
            400,
            "/",
        );
    };
    let return_to = safe_return_to(fields.get("return_to").unwrap_or("/"));
    // Browsers name the port in Origin when it is not the default one, as in Host.
    let origin = format!(
        "{}://{}",
        conn.scheme.as_str(),
        String::from_utf8_lossy(conn.head.host_header()).to_ascii_lowercase()
    );
    let csrf_cookie = cookies::find(conn.head.fields.iter(), csrf::COOKIE_NAME);
    if !csrf::check(
        csrf_cookie.as_deref(),
        fields.get("csrf"),
        conn.head.fields.get("origin"),
        &origin,
    ) {
        return login_form(
            conn,
            service,
            auth,
            Some("Your sign-in form expired. Please try again."),
            403,
            &return_to,
        );
    }
    let (method, request) = match fields.get("method") {
        Some("pin") if auth.pin => (
            "pin",
            authenticate_request::Request::Pin(proto::PinRequest {
                pin: fields.get("pin").unwrap_or_default().to_string(),
            }),
        ),
        Some("password") if auth.password => (
            "password",
            authenticate_request::Request::Password(proto::PasswordRequest {
                password: fields.get("password").unwrap_or_default().to_string(),
            }),
        ),
        _ => {
            return login_form(
                conn,
                service,
                auth,
                Some("Choose a sign-in method."),
                400,
                &return_to,
            );
        }
    };
    log.method = method.into();
    let lockout = &ctx.shared.lockout;
    let started = std::time::Instant::now();
    if let Err(wait) = lockout.check(&service.id, client_ip, started) {
        return locked(conn, wait);
    }
    let answer = ctx
        .shared
        .auth_calls
        .authenticate(AuthenticateRequest {
            id: service.id.clone(),
            account_id: service.account_id.clone(),
            request: Some(request),
        })
        .await;
    let token = match answer {
        Ok(r) if r.success => r.session_token,
        Ok(_) => {
            if let Some(wait) = lockout.failure(&service.id, client_ip, std::time::Instant::now()) {
                return locked(conn, wait);
            }
            let what = if method == "pin" { "PIN" } else { "password" };
            let error = format!("Wrong {what}.");
            return login_form(conn, service, auth, Some(&error), 401, &return_to);
        }
        Err(e) => return unavailable(service, e),
    };
    let Ok(claims) = auth.verifier.verify(&token, &service.domain, now) else {
        tracing::warn!(service = %service.id, "management issued a session token that does not verify with the service's key");
        return unavailable(service, AuthCallError::Unavailable("bad token".into()));
    };
    lockout.success(&service.id, client_ip);
    log.user_id = claims.sub.clone();
    log.success = true;
    Reply::Send(see_other(conn, &return_to, &token, auth))
}

#[allow(clippy::too_many_arguments)]
async fn header_auth(
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    auth: &ServiceAuth,
    client_ip: IpAddr,
    name: &str,
    value: &str,
    log: &mut GateLog,
    now: i64,
) -> Reply {
    let lockout = &ctx.shared.lockout;
    if let Err(wait) = lockout.check(&service.id, client_ip, std::time::Instant::now()) {
        return Reply::Send(Page::too_many(wait));
    }
    // A header value management accepted is remembered like a session (until the session it
    // issued expires), so API clients do not cost an argon2 check on management per request.
    let remembered = format!("header\0{name}\0{value}");
    let key = auth.verifier.key_bytes();
    if let Some(identity) = ctx
        .sessions
        .borrow()
        .get(&remembered, &service.domain, &key, now)
    {
        log.user_id = identity.user_id.clone();
        log.success = true;
        return Reply::Pass((*identity).clone());
    }
    let answer = ctx
        .shared
        .auth_calls
        .authenticate(AuthenticateRequest {
            id: service.id.clone(),
            account_id: service.account_id.clone(),
            request: Some(authenticate_request::Request::HeaderAuth(
                proto::HeaderAuthRequest {
                    header_value: value.to_string(),
                    header_name: name.to_string(),
                },
            )),
        })
        .await;
    match answer {
        Ok(r) if r.success => match auth.verifier.verify(&r.session_token, &service.domain, now) {
            Ok(claims) => {
                lockout.success(&service.id, client_ip);
                log.user_id = claims.sub.clone();
                log.success = true;
                let identity = Identity::from_claims(&claims);
                ctx.sessions.borrow_mut().insert(
                    &remembered,
                    &service.domain,
                    key,
                    claims.exp.min(now + HEADER_MEMORY_SECS),
                    Rc::new(identity.clone()),
                );
                Reply::Pass(identity)
            }
            Err(e) => {
                tracing::warn!(service = %service.id, error = %e, "management issued a session token that does not verify");
                Reply::Send(Page::plain(502, "Authentication service unavailable.\n"))
            }
        },
        Ok(_) => {
            if let Some(wait) = lockout.failure(&service.id, client_ip, std::time::Instant::now()) {
                return Reply::Send(Page::too_many(wait));
            }
            Reply::Send(Page::unauthorized(&service.domain))
        }
        Err(e) => {
            tracing::warn!(service = %service.id, error = %e, "header credentials not checked");
            Reply::Send(Page::plain(502, "Authentication service unavailable.\n"))
        }
    }
}

async fn start_sso(conn: &Conn, ctx: &Rc<WorkerCtx>, service: &Service, return_to: &str) -> Reply {
    // The Host header as sent keeps a non-default port, which the browser must come back to.
    // The nonce in the way back binds the sign-in to this browser (see `csrf::sso_check`).
    let nonce = csrf::new_nonce();
    let return_to = strip_query_params(return_to, &["session_token", csrf::SSO_PARAM]);
    let sep = if return_to.contains('?') { '&' } else { '?' };
    let redirect_url = format!(
        "{}://{}{return_to}{sep}{}={nonce}",
        conn.scheme.as_str(),
        String::from_utf8_lossy(conn.head.host_header()).to_ascii_lowercase(),
        csrf::SSO_PARAM,
    );
    let secure = conn.scheme == ClientScheme::Https;
    match ctx
        .shared
        .auth_calls
        .oidc_url(proto::GetOidcurlRequest {
            id: service.id.clone(),
            account_id: service.account_id.clone(),
            redirect_url,
        })
        .await
    {
        Ok(r) if r.url.starts_with("https://") || r.url.starts_with("http://") => Reply::Send(
            Page::redirect(302, &r.url)
                .with("Set-Cookie", csrf::sso_set_cookie_header(&nonce, secure)),
        ),
        Ok(_) => unavailable(service, AuthCallError::Unavailable("no sign-in URL".into())),
        Err(e) => unavailable(service, e),
    }
}

async fn finish_sso(
    conn: &Conn,
    ctx: &Rc<WorkerCtx>,
    service: &Service,
    auth: &ServiceAuth,
    token: &str,
    log: &mut GateLog,
) -> Reply {
    log.method = "oidc".into();
    let secure = conn.scheme == ClientScheme::Https;
    let cookie = cookies::find(conn.head.fields.iter(), csrf::SSO_COOKIE_NAME);
    let param = query_param(conn.head.path_and_query(), csrf::SSO_PARAM);
    if !csrf::sso_check(cookie.as_deref(), param.as_deref()) {
        // Never validated: a token that arrives in a browser which did not start the sign-in
        // would sign that browser in as someone else.
        return Reply::Send(Page::html(
            403,
            login_page::denied_page(
                &service.domain,
                "This sign-in was started in another browser or has expired. Please sign in again.",
            ),
        ));
    }
    let answer = ctx
        .shared
        .auth_calls
        .validate_session(proto::ValidateSessionRequest {
            domain: service.domain.clone(),
            session_token: token.to_string(),
        })
        .await;
    match answer {
        Ok(r) if r.valid => {
            log.user_id = r.user_id;
            log.success = true;
            let clean = strip_query_params(
                conn.head.path_and_query(),
                &["session_token", csrf::SSO_PARAM],
            );
            Reply::Send(
                see_other(conn, &safe_return_to(&clean), token, auth)
                    .with("Set-Cookie", csrf::sso_clear_cookie_header(secure)),
            )
        }
        Ok(r) => {
            log.user_id = r.user_id;
            let reason = describe_denial(&r.denied_reason);
            Reply::Send(Page::html(
                403,
                login_page::denied_page(&service.domain, reason),
            ))
        }
        Err(e) => unavailable(service, e),
    }
}

fn describe_denial(reason: &str) -> &'static str {
    match reason {
        "not_in_group" | "user_not_in_group" | "group" => {
            "Your account is not in a group that may use this service."
        }
        "expired" | "invalid_token" | "invalid" => "Your sign-in expired. Please sign in again.",
        _ => "You are not allowed to use this service.",
    }
}

/// 303 to `return_to` with the session cookie set.
fn see_other(conn: &Conn, return_to: &str, token: &str, auth: &ServiceAuth) -> Page {
    let cookie = cookies::session_set_cookie(
        COOKIE_NAME,
        token,
        auth.max_session_age_secs,
        conn.scheme == ClientScheme::Https,
    );
    Page::redirect(303, return_to).with("Set-Cookie", cookie)
}

fn locked(conn: &Conn, wait: Duration) -> Reply {
    if wants_html(conn) {
        let secs = wait.as_secs().max(1);
        Reply::Send(
            Page::html(429, login_page::locked_page(secs)).with("Retry-After", secs.to_string()),
        )
    } else {
        Reply::Send(Page::too_many(wait))
    }
}

fn unavailable(service: &Service, e: AuthCallError) -> Reply {
    tracing::warn!(service = %service.id, error = %e, "sign-in not possible");
    Reply::Send(Page::plain(
        502,
        "The authentication service is unavailable. Please retry shortly.\n",
    ))
}

/// The identity of a valid session cookie: from this worker's memory of verified tokens, or
/// verified now (and remembered).
fn session_from_cookie(
    conn: &Conn,
    ctx: &WorkerCtx,
    service: &Service,
    auth: &ServiceAuth,
    now: i64,
) -> Option<Rc<Identity>> {
    let token = cookies::find(conn.head.fields.iter(), COOKIE_NAME)?;
    let key = auth.verifier.key_bytes();
    if let Some(identity) = ctx
        .sessions
        .borrow()
        .get(&token, &service.domain, &key, now)
    {
        return Some(identity);
    }
    match auth.verifier.verify(&token, &service.domain, now) {
        Ok(claims) => {
            let identity = Rc::new(Identity::from_claims(&claims));
            ctx.sessions.borrow_mut().insert(
                &token,
                &service.domain,
                key,
                claims.exp,
                identity.clone(),
            );
            Some(identity)
        }
        Err(e) => {
            tracing::debug!(service = %service.id, error = %e, "session cookie refused");
            None
        }
    }
}

/// Reads a login form body: `Content-Length` framing, at most [`MAX_FORM`] bytes.
async fn read_form_body<S: AsyncReadRent>(
    client: &mut S,
    conn: &mut Conn,
    ctx: &Rc<WorkerCtx>,
) -> Result<Vec<u8>, u16> {
    let len = match conn.head.framing {
        Framing::Length(n) if n <= MAX_FORM => n as usize,
        Framing::Length(_) => return Err(413),
        Framing::None => 0,
        _ => return Err(411),
    };
    let deadline = monoio::time::Instant::now() + ctx.shared.config.limits.header_timeout;
    while conn.inbuf.data().len() < len {
        match monoio::time::timeout_at(deadline, conn.inbuf.fill(client)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(408),
        }
    }
    let body = conn.inbuf.data()[..len].to_vec();
    conn.inbuf.consume(len);
    // The body is read: the connection may carry on.
    conn.head.framing = Framing::None;
    Ok(body)
}

async fn send<S: AsyncWriteRent>(client: &mut S, conn: &mut Conn) {
    let _ = monoio::time::timeout(
        Duration::from_secs(10),
        crate::dataplane::inbuf::write_vec(client, std::mem::take(&mut conn.out)),
    )
    .await;
}

fn wants_html(conn: &Conn) -> bool {
    conn.head
        .fields
        .get("accept")
        .is_some_and(|a| a.windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html")))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A local path to return to after sign-in; anything else (another host, a scheme-relative
/// `//evil`, a backslash trick) becomes `/`, so the login cannot be used as an open redirect.
pub fn safe_return_to(candidate: &str) -> String {
    let ok = candidate.starts_with('/')
        && !candidate.starts_with("//")
        && !candidate.contains('\\')
        && candidate.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        candidate.to_string()
    } else {
        "/".to_string()
    }
}

/// The decoded value of `name` in the query of `path_and_query`.
fn query_param(path_and_query: &str, name: &str) -> Option<String> {
    let (_, query) = path_and_query.split_once('?')?;
    let pairs = form::parse(query.as_bytes()).ok()?;
    pairs.get(name).map(str::to_string)
}

/// `path_and_query` without the pairs of its query named in `names`.
fn strip_query_params(path_and_query: &str, names: &[&str]) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.split('=').next().is_some_and(|n| names.contains(&n)))
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_is_local_only() {
        assert_eq!(safe_return_to("/app?x=1"), "/app?x=1");
        assert_eq!(safe_return_to("//evil.example/"), "/");
        assert_eq!(safe_return_to("https://evil.example/"), "/");
        assert_eq!(safe_return_to("/\\evil.example"), "/");
        assert_eq!(safe_return_to("/a b"), "/");
    }

    #[test]
    fn session_token_is_removed_from_the_query() {
        assert_eq!(
            strip_query_params("/x?session_token=abc", &["session_token"]),
            "/x"
        );
        assert_eq!(
            strip_query_params("/x?a=1&session_token=abc&b=2", &["session_token"]),
            "/x?a=1&b=2"
        );
        assert_eq!(
            strip_query_params(
                "/x?nb_sso=n&a=1&session_token=t",
                &["session_token", "nb_sso"]
            ),
            "/x?a=1"
        );
        assert_eq!(
            query_param("/x?a=1&session_token=t%2B1", "session_token").as_deref(),
            Some("t+1")
        );
    }

    #[test]
    fn identity_prefers_email_and_names() {
        let claims = SessionClaims {
            iss: String::new(),
            aud: proto::session::Audience::One(String::new()),
            sub: "u1".into(),
            exp: 0,
            iat: 0,
            nbf: None,
            method: "oidc".into(),
            email: "a@example.com".into(),
            groups: vec!["g1".into(), "g2".into()],
            group_names: vec!["admins".into(), "ops".into()],
        };
        let id = Identity::from_claims(&claims);
        assert_eq!(id.user, "a@example.com");
        assert_eq!(id.groups, "admins,ops");
    }
}
