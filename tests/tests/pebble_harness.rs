//! The Pebble harness (`tests::pebble`) itself: the directory answers over TLS trusting
//! `directory_ca_file()`, the issuing root parses, `order_count()` counts, and a real http-01
//! issuance through Pebble's validation authority (to `http_port`, the name resolved to
//! loopback by its DNS) yields a chain that verifies against `issuing_roots_pem()` and lives
//! exactly the requested validity.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use tests::pebble::{Pebble, PebbleOptions};
use tests::process::stdout_of;
use tests::proxy::{TestDir, free_port};
use x509_cert::der::Decode;

const NAME: &str = "pebble-harness.test";
const VALIDITY: Duration = Duration::from_secs(60);

#[test]
fn pebble_harness_serves_directory_counts_orders_and_issues() {
    let dir = TestDir::new("pebble-harness");
    let http_port = free_port();
    let Some(pebble) = Pebble::start(
        &dir,
        PebbleOptions {
            http_port,
            tls_port: free_port(),
            validity: Some(VALIDITY),
        },
    ) else {
        return;
    };

    // The directory, through the real curl trusting only the listener's CA.
    let body = stdout_of(
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(pebble.directory_ca_file())
            .arg(pebble.directory_url()),
        "curl Pebble's directory",
    );
    let directory: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "directory is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    let new_order = directory["newOrder"]
        .as_str()
        .expect("newOrder in directory");
    assert!(
        new_order.starts_with("https://127.0.0.1:"),
        "newOrder {new_order}"
    );

    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pebble.issuing_roots_pem().as_bytes())
            .collect::<Result<_, _>>()
            .expect("issuing root is PEM");
    assert_eq!(roots.len(), 1, "one issuing root");
    x509_cert::Certificate::from_der(&roots[0]).expect("issuing root is a certificate");
    assert_eq!(
        std::fs::read_to_string(pebble.issuing_roots_file()).expect("root file"),
        pebble.issuing_roots_pem()
    );

    assert_eq!(pebble.order_count(), 0, "no order yet");

    let responder = Http01Responder::start(http_port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let chain_pem = rt.block_on(issue(&pebble, &responder));
    assert!(
        responder.hits.load(Ordering::Relaxed) >= 1,
        "Pebble's VA never came to the http-01 port"
    );
    assert_eq!(
        pebble.order_count(),
        1,
        "exactly one order\n{}",
        pebble.log_text()
    );

    // The chain (leaf + intermediate) verifies against the issuing root, for the name.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("issued chain is PEM");
    assert!(chain.len() >= 2, "leaf and intermediate: {chain_pem}");
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root).expect("add issuing root");
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(NAME).expect("name"),
            &[],
            UnixTime::now(),
        )
        .expect("the issued chain verifies against issuing_roots_pem()");

    // Pebble: notBefore = issuance time, notAfter = notBefore + validity - 1 s.
    let leaf = x509_cert::Certificate::from_der(&chain[0]).expect("leaf parses");
    let validity = &leaf.tbs_certificate.validity;
    let span = validity.not_after.to_unix_duration() - validity.not_before.to_unix_duration();
    assert_eq!(span, VALIDITY - Duration::from_secs(1), "leaf validity");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let age = now.saturating_sub(validity.not_before.to_unix_duration());
    assert!(
        age < Duration::from_secs(30),
        "notBefore is the issuance time"
    );
}

/// Account, order (counted at once), http-01 through `responder`, finalize with a CSR of our
/// own, the PEM chain.
async fn issue(pebble: &Pebble, responder: &Http01Responder) -> String {
    // instant-acme's client builds its rustls config with the process default provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (account, _credentials) = Account::builder_with_root(pebble.directory_ca_file())
        .expect("ACME client")
        .create(
            &NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            pebble.directory_url(),
            None,
        )
        .await
        .expect("new account");
    assert_eq!(pebble.order_count(), 0, "an account is no order");

    let identifiers = [Identifier::Dns(NAME.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .expect("new order");
    assert_eq!(pebble.order_count(), 1, "the order is counted once created");
    assert_eq!(order.state().status, OrderStatus::Pending);

    let mut authorizations = order.authorizations();
    let mut solved = 0;
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.expect("authorization");
        // PEBBLE_AUTHZREUSE=0: never an authorization that is already valid.
        assert_eq!(authz.status, AuthorizationStatus::Pending);
        let mut challenge = authz
            .challenge(ChallengeType::Http01)
            .expect("http-01 challenge");
        responder.serve(
            &challenge.token,
            challenge.key_authorization().as_str().to_string(),
        );
        challenge.set_ready().await.expect("challenge ready");
        solved += 1;
    }
    assert_eq!(solved, 1);

    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(100))
        .backoff(1.5)
        .timeout(Duration::from_secs(60));
    let status = order.poll_ready(&retries).await.expect("order ready");
    assert_eq!(status, OrderStatus::Ready, "{}", pebble.log_text());

    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![NAME.to_string()]).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).expect("CSR");
    order.finalize_csr(csr.der()).await.expect("finalize");
    order.poll_certificate(&retries).await.expect("certificate")
}

/// A plain-HTTP server on loopback answering `/.well-known/acme-challenge/<token>` with the key
/// authorization: what the proxy's HTTP listener does for http-01. Stopped and joined on drop;
/// it never runs longer than two minutes.
struct Http01Responder {
    tokens: Arc<Mutex<HashMap<String, String>>>,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Http01Responder {
    fn start(port: u16) -> Http01Responder {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind http-01 port");
        listener.set_nonblocking(true).expect("nonblocking");
        let tokens: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tokens, hits, stop) = (tokens.clone(), hits.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            hits.fetch_add(1, Ordering::Relaxed);
                            let _ = answer(conn, &tokens);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Http01Responder {
            tokens,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn serve(&self, token: &str, key_authorization: String) {
        self.tokens
            .lock()
            .expect("tokens")
            .insert(token.to_string(), key_authorization);
    }
}

impl Drop for Http01Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(
    mut conn: std::net::TcpStream,
    tokens: &Mutex<HashMap<String, String>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    let body = path
        .strip_prefix("/.well-known/acme-challenge/")
        .and_then(|token| tokens.lock().ok()?.get(token).cloned());
    let response = match body {
        Some(body) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    conn.write_all(response.as_bytes())
}
