//! Start-up, drivers, health, configuration errors and graceful shutdown.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::backend::Backend;
use tests::client::curl;
use tests::proxy::{Proxy, ProxyOptions, binary};

fn one_service(port: u16) -> String {
    format!(
        "[[service]]\nid='s'\ndomain='s.test.internal'\n[[service.path]]\ntarget='http://127.0.0.1:{port}'\n"
    )
}

#[test]
fn io_uring_is_the_driver_that_runs_and_health_reports_it() {
    let t = Backend::start("t");
    let proxy = Proxy::start(ProxyOptions::new(one_service(t.port())));
    let h = proxy.health();
    let switch = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
    match switch.as_deref().map(str::trim) {
        Some("0") => assert_eq!(h["io_driver"], "io_uring", "{h}"),
        other => eprintln!("skipping the io_uring assertion: io_uring_disabled is {other:?} here"),
    }
    assert_eq!(h["management_connected"], false);
    assert_eq!(h["initial_sync_complete"], false);
    assert_eq!(h["workers"], 2);
    assert_eq!(h["services"], 1);
    assert_eq!(
        curl(
            &proxy.ca_path(),
            "s.test.internal",
            proxy.https_port,
            "/",
            &[]
        )
        .status,
        200
    );
}

#[test]
fn the_epoll_fallback_serves_too() {
    let t = Backend::start("t");
    let proxy =
        Proxy::start(ProxyOptions::new(one_service(t.port())).env("NB_PROXY_IO_DRIVER", "legacy"));
    assert_eq!(proxy.health()["io_driver"], "legacy");
    for _ in 0..3 {
        let r = curl(
            &proxy.ca_path(),
            "s.test.internal",
            proxy.https_port,
            "/x",
            &["-d", "body"],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["body_bytes"], 4);
    }
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let t = Backend::start("t");
    let mut proxy = Proxy::start(ProxyOptions::new(one_service(t.port())));
    let ca = proxy.ca_path();
    let port = proxy.https_port;
    let slow = std::thread::spawn(move || curl(&ca, "s.test.internal", port, "/slow?ms=1500", &[]));
    // Wait (bounded) until the request reached the target, then stop the proxy.
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.request_count() == 0 && proxy.health()["connections"]["active"].as_u64() == Some(0) {
        assert!(Instant::now() < deadline, "slow request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let status = proxy.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    let r = slow.join().expect("client");
    assert_eq!(r.status, 200, "the in-flight request was cut: {}", r.text());
    // After SIGTERM nothing listens any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn bad_configuration_fails_fast_with_a_clear_message() {
    let dir = tests::proxy::TestDir::new("badcfg");
    let bad = dir.0.join("m.toml");
    std::fs::write(&bad, "[[service]]\nid='x'\ndomain='x.test'\nbogus=1\n").expect("file");
    let out = Command::new(binary())
        .arg("proxy")
        .env("NB_PROXY_MAPPINGS_FILE", &bad)
        .env("NB_PROXY_ADDRESS", "127.0.0.1:0")
        .env("NB_PROXY_HTTP_ADDRESS", "off")
        .env("NB_PROXY_HEALTH_ADDRESS", "127.0.0.1:0")
        .env("NB_PROXY_CERTIFICATE_DIRECTORY", &dir.0)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus") && err.contains("m.toml"), "{err}");

    let out = Command::new(binary())
        .args(["proxy", "--addr", ":notaport"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NB_PROXY_ADDRESS"));
}

#[test]
fn help_explains_every_setting() {
    let out = Command::new(binary())
        .args(["proxy", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "NB_PROXY_ADDRESS",
        "NB_PROXY_DOMAIN",
        "NB_PROXY_CERTIFICATE_DIRECTORY",
        "NB_PROXY_CERTIFICATE_FILE",
        "NB_PROXY_CERTIFICATE_KEY_FILE",
        "NB_PROXY_WILDCARD_CERT_DIR",
        "NB_PROXY_HEALTH_ADDRESS",
        "NB_PROXY_LOG_LEVEL",
        "NB_PROXY_MAPPINGS_FILE",
        "NB_PROXY_WORKERS",
        "NB_PROXY_HTTP_ADDRESS",
    ] {
        assert!(help.contains(var), "--help does not mention {var}");
    }
}
