//! The plain-HTTP listener: every request for a published host is redirected to HTTPS, except
//! ACME http-01 validations, which get their key authorization.

use std::rc::Rc;

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::time::Instant;

use super::head::{HeadError, RequestHead};
use super::responses::{self, ProxyStatus};
use crate::dataplane::WorkerCtx;
use crate::dataplane::inbuf::{InBuf, write_vec};

pub async fn serve<S: AsyncReadRent + AsyncWriteRent>(
    mut client: S,
    ctx: Rc<WorkerCtx>,
    accepted_at: Instant,
) {
    let deadline = accepted_at + ctx.shared.config.limits.header_timeout;
    let mut inbuf = InBuf::with_capacity(4096);
    let mut head = RequestHead::default();
    let mut out = Vec::with_capacity(512);
    loop {
        match head.parse(inbuf.data()) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => {
                let status = if e == HeadError::TooLarge {
                    ProxyStatus::HeadersTooLarge
                } else {
                    ProxyStatus::BadRequest
                };
                responses::error_page(&mut out, status, true, false);
                let _ = monoio::time::timeout_at(deadline, write_vec(&mut client, out)).await;
                return;
            }
        }
        match monoio::time::timeout_at(deadline, inbuf.fill(&mut client)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
    let known = !head.host.is_empty() && ctx.routes().service(&head.host).is_some();
    let acme = head
        .path()
        .strip_prefix(crate::acme::HTTP01_PREFIX)
        .and_then(|token| ctx.shared.acme_http01(token));
    if let Some(answer) = acme {
        responses::acme_challenge(&mut out, answer.as_deref(), head.is_head());
    } else if known {
        let https_port = ctx.shared.config.https_listen.port();
        let location = if https_port == 443 {
            format!("https://{}{}", head.host, head.path_and_query())
        } else {
            format!(
                "https://{}:{}{}",
                head.host,
                https_port,
                head.path_and_query()
            )
        };
        let safe = matches!(head.method(), b"GET" | b"HEAD");
        responses::redirect(&mut out, &location, safe);
    } else {
        responses::error_page(&mut out, ProxyStatus::NotFound, true, head.is_head());
    }
    let _ = monoio::time::timeout_at(deadline, write_vec(&mut client, out)).await;
    let _ = client.shutdown().await;
}
