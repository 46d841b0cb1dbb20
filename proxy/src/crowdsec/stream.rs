//! Follows `GET /v1/decisions/stream` on the control thread: `startup=true` first (every
//! decision in force), then `startup=false` each interval (what was added or deleted since).
//! A failed call keeps the decisions known so far and starts over with `startup=true`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::{Bouncer, Decision, DecisionSet, Target, parse_go_duration};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A startup answer for the cap of 200,000 decisions is ~50 MiB of JSON.
const MAX_BODY: usize = 64 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize, Default)]
struct StreamAnswer {
    #[serde(default)]
    new: Option<Vec<WireDecision>>,
    #[serde(default)]
    deleted: Option<Vec<WireDecision>>,
}

#[derive(Debug, Deserialize)]
struct WireDecision {
    #[serde(default)]
    id: i64,
    #[serde(default)]
    duration: String,
    #[serde(default)]
    scenario: String,
    #[serde(default)]
    scope: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    value: String,
}

impl WireDecision {
    fn target(&self) -> Option<Target> {
        let value = self.value.trim();
        match self.scope.to_ascii_lowercase().as_str() {
            "ip" => value
                .parse()
                .ok()
                .map(|ip| Target::Ip(crate::routes::access::canonical(ip))),
            "range" => value
                .parse::<ipnet::IpNet>()
                .ok()
                .map(|n| Target::Range(n.trunc())),
            // Country, AS and other scopes are not about one address.
            _ => None,
        }
    }
}

/// Applies one stream answer; returns how many new decisions did not fit.
fn apply(set: &mut DecisionSet, answer: StreamAnswer, now: Instant) -> u64 {
    for d in answer.deleted.unwrap_or_default() {
        if let Some(t) = d.target() {
            set.remove(t, d.id);
        }
    }
    let mut refused = 0;
    for d in answer.new.unwrap_or_default() {
        let Some(target) = d.target() else {
            continue;
        };
        if !matches!(d.kind.as_str(), "ban" | "captcha") {
            continue;
        }
        let decision = Decision {
            id: d.id,
            verdict: format!("{}:{}", d.kind, d.scenario),
            expires: parse_go_duration(&d.duration).map(|left| now + left),
        };
        if !set.add(target, decision) {
            refused += 1;
        }
    }
    refused
}

pub async fn run(bouncer: Arc<Bouncer>) {
    let connector = match HttpsConnectorBuilder::new().with_native_roots() {
        Ok(b) => b.https_or_http().enable_http1().build(),
        Err(e) => {
            tracing::error!(error = %e, "CrowdSec: no TLS roots; the bouncer is off");
            return;
        }
    };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let base = bouncer.settings.url.trim_end_matches('/').to_string();
    let mut set = DecisionSet::default();
    let mut startup = true;
    let mut backoff = Duration::from_secs(1);
    let mut warned_full = false;
    loop {
        let url = format!("{base}/v1/decisions/stream?startup={startup}");
        match fetch(&client, &url, &bouncer.settings.api_key).await {
            Ok(answer) => {
                if startup {
                    // A full snapshot: whatever is not in it is no longer in force.
                    set = DecisionSet::default();
                }
                let refused = apply(&mut set, answer, Instant::now());
                if refused > 0 && !warned_full {
                    tracing::warn!(
                        refused,
                        cap = super::MAX_DECISIONS,
                        "CrowdSec: too many decisions; the excess is not enforced"
                    );
                    warned_full = true;
                }
                bouncer.publish(set.clone());
                bouncer.set_status(|s| {
                    s.connected = true;
                    s.last_error = None;
                    s.refused_full += refused;
                });
                startup = false;
                backoff = Duration::from_secs(1);
                tokio::time::sleep(bouncer.settings.interval).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "CrowdSec Local API not reachable; keeping the known decisions");
                bouncer.set_status(|s| {
                    s.connected = false;
                    s.last_error = Some(e.clone());
                });
                startup = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn fetch<C>(
    client: &Client<C, Empty<Bytes>>,
    url: &str,
    key: &str,
) -> Result<StreamAnswer, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let request = Request::get(url)
        .header("X-Api-Key", key)
        .header(
            "User-Agent",
            concat!("portcullis/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_string())??;
    if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
        return Err(format!(
            "the Local API refused the bouncer key ({status}): check NB_PROXY_CROWDSEC_API_KEY"
        ));
    }
    if !status.is_success() {
        return Err(format!("the Local API answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("not a decision stream: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_the_lapi_format() {
        let mut set = DecisionSet::default();
        let now = Instant::now();
        let answer: StreamAnswer = serde_json::from_str(
            r#"{"deleted":null,"new":[
              {"duration":"59m59.4s","id":1,"origin":"cscli","scenario":"manual 'ban'","scope":"Ip","type":"ban","value":"127.0.0.5"},
              {"duration":"1h","id":2,"scenario":"x","scope":"Range","type":"ban","value":"10.9.0.0/16"},
              {"duration":"1h","id":3,"scenario":"x","scope":"Country","type":"ban","value":"FR"},
              {"duration":"1h","id":4,"scenario":"x","scope":"Ip","type":"throttle","value":"192.0.2.9"}]}"#,
        )
        .unwrap();
        assert_eq!(apply(&mut set, answer, now), 0);
        assert_eq!(set.len(), 2);
        assert_eq!(
            set.verdict("127.0.0.5".parse().unwrap(), now),
            Some("ban:manual 'ban'")
        );
        assert!(set.verdict("10.9.3.4".parse().unwrap(), now).is_some());
        assert!(set.verdict("192.0.2.9".parse().unwrap(), now).is_none());
        let gone: StreamAnswer = serde_json::from_str(
            r#"{"new":null,"deleted":[{"duration":"-1s","id":1,"scope":"Ip","type":"ban","value":"127.0.0.5"}]}"#,
        )
        .unwrap();
        apply(&mut set, gone, now);
        assert!(set.verdict("127.0.0.5".parse().unwrap(), now).is_none());
    }
}
