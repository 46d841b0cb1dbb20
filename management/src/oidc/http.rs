//! The HTTP client that talks to identity providers: bounded in time and in answer size.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::OidcError;

/// Discovery documents, key sets and token answers are small; anything larger is refused.
const MAX_ANSWER: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    pub fn new() -> Result<Self, OidcError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(OidcError::Roots)?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends `req`; the status and the whole body (≤ 1 MiB, ≤ 10 s).
    pub async fn send(&self, req: ::http::Request<Full<Bytes>>) -> Result<(u16, Bytes), OidcError> {
        let url = req.uri().to_string();
        let fail = |reason: String| OidcError::Fetch {
            url: url.clone(),
            reason,
        };
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))?
    }

    /// GET `url` expecting 200 and JSON.
    pub async fn get_json(&self, url: &str) -> Result<serde_json::Value, OidcError> {
        let req = ::http::Request::get(url)
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Fetch {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        let (status, body) = self.send(req).await?;
        json_answer(url, status, &body)
    }
}

/// The JSON of a 200 answer, or an error that shows (a bounded part of) what came instead.
pub fn json_answer(url: &str, status: u16, body: &[u8]) -> Result<serde_json::Value, OidcError> {
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(OidcError::Status {
            url: url.to_string(),
            status,
            body: text,
        });
    }
    serde_json::from_slice(body).map_err(|e| OidcError::Document {
        url: url.to_string(),
        reason: format!("not JSON: {e}"),
    })
}
