//! Bodies are streamed, never buffered whole; upgrades become tunnels.

use std::process::Command;

use tests::backend::{Backend, FNV_OFFSET, fnv1a64};
use tests::client::{curl, tls_connect};
use tests::process::stdout_of;
use tests::proxy::{Proxy, ProxyOptions};

fn one_service(name: &str, port: u16) -> String {
    format!(
        "[[service]]\nid='{name}'\ndomain='{name}.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{port}'\n"
    )
}

#[test]
fn one_gib_chunked_upload_streams_with_flat_memory() {
    const GIB: u64 = 1 << 30;
    let t = Backend::start("up");
    let proxy = Proxy::start(ProxyOptions::new(one_service("up", t.port())));
    let rss_before = proxy.peak_rss_kib();
    let script = format!(
        "head -c {GIB} /dev/zero | curl -sS -i --http1.1 --max-time 300 --cacert {ca} \
         --resolve up.test.internal:{port}:127.0.0.1 -T - https://up.test.internal:{port}/upload",
        ca = proxy.ca_path().display(),
        port = proxy.https_port
    );
    let out = stdout_of(Command::new("sh").arg("-c").arg(&script), "the upload");
    let r = tests::client::parse_response(&out);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["body_bytes"].as_u64(), Some(GIB));
    let zeros = vec![0u8; 1 << 16];
    let mut h = FNV_OFFSET;
    for _ in 0..(GIB >> 16) {
        h = fnv1a64(&zeros, h);
    }
    assert_eq!(v["body_fnv1a64"].as_u64(), Some(h), "body arrived intact");
    let chunked = v["headers"].as_array().unwrap().iter().any(|h| {
        h[0].as_str()
            .is_some_and(|n| n.eq_ignore_ascii_case("transfer-encoding"))
    });
    assert!(
        chunked,
        "curl sent the upload chunked and the proxy kept the framing"
    );
    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS: before {rss_before} KiB, after 1 GiB upload {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB is not under 64 MiB");
}

#[test]
fn content_length_upload_with_expect_100_continue() {
    let t = Backend::start("exp");
    let proxy = Proxy::start(ProxyOptions::new(one_service("exp", t.port())));
    let file = proxy.dir.0.join("payload.bin");
    let mut data = Vec::with_capacity(8 << 20);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    while data.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&file, &data).expect("payload");
    let r = curl(
        &proxy.ca_path(),
        "exp.test.internal",
        proxy.https_port,
        "/put",
        &[
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["body_bytes"].as_u64(), Some(data.len() as u64));
    assert_eq!(v["body_fnv1a64"].as_u64(), Some(fnv1a64(&data, FNV_OFFSET)));
}

#[test]
fn large_download_passes_intact() {
    let t = Backend::start("down");
    let proxy = Proxy::start(ProxyOptions::new(one_service("down", t.port())));
    let n = 50 << 20;
    let r = curl(
        &proxy.ca_path(),
        "down.test.internal",
        proxy.https_port,
        &format!("/big?bytes={n}"),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(r.body.iter().all(|&b| b == b'x'));
}

#[test]
fn websocket_echo_through_the_proxy() {
    let t = Backend::start("ws");
    let proxy = Proxy::start(ProxyOptions::new(one_service("ws", t.port())));
    let stream = tls_connect(&proxy.ca.pem, "ws.test.internal", proxy.https_port);
    let url = format!("wss://ws.test.internal:{}/ws", proxy.https_port);
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), stream).expect("websocket handshake through the proxy");
    assert_eq!(resp.status().as_u16(), 101);
    for i in 0..20 {
        let msg = format!("hello {i}");
        ws.send(tungstenite::Message::text(msg.clone()))
            .expect("send");
        let echoed = ws.read().expect("read echo");
        assert_eq!(echoed.into_text().expect("text").as_str(), msg);
    }
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(tungstenite::Message::binary(big.clone()))
        .expect("send binary");
    let echoed = ws.read().expect("read binary echo");
    assert_eq!(echoed.into_data().as_ref(), big.as_slice());
    let _ = ws.close(None);
}

#[test]
fn chunked_responses_reach_http11_and_http10_clients() {
    let t = Backend::start("ch");
    let proxy = Proxy::start(ProxyOptions::new(one_service("ch", t.port())));
    let expected: String = (0..300).map(|i| format!("part-{i};")).collect();
    let r = curl(
        &proxy.ca_path(),
        "ch.test.internal",
        proxy.https_port,
        "/chunked?parts=300",
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), expected);
    // An HTTP/1.0 client cannot read chunked framing: it gets the payload, ended by close.
    let r = curl(
        &proxy.ca_path(),
        "ch.test.internal",
        proxy.https_port,
        "/chunked?parts=300",
        &["--http1.0"],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.text(), expected);
}
