//! CrowdSec end to end: a real Local API (Debian's `crowdsec`, run alone), decisions added and
//! deleted with `cscli`, and the proxy following the decision stream: `enforce` services refuse
//! a banned address (HTTP 403, L4 connection closed), `observe` services serve it; with the
//! kernel fast path on, bans of `enforce` L4 ports are dropped by XDP.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tests::backend::Backend;
use tests::client::curl;
use tests::crowdsec::LocalApi;
use tests::l4_client::tcp_from;
use tests::l4_targets::Target;
use tests::proxy::{Proxy, ProxyOptions, TestDir, free_port};

fn status(p: &Proxy, host: &str, source: &str) -> u16 {
    curl(
        &p.ca_path(),
        host,
        p.https_port,
        "/",
        &["--interface", source],
    )
    .status
}

/// Polls (≤ 15 s) until `f` holds.
fn eventually(what: &str, p: &Proxy, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen; proxy log:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The proxy on `mappings`, following the Local API's stream every second.
fn start_proxy(lapi: &LocalApi, mappings: String, (key, value): (&str, &str)) -> Proxy {
    Proxy::start(
        ProxyOptions::new(mappings)
            .env("NB_PROXY_CROWDSEC_API_URL", &lapi.url)
            .env("NB_PROXY_CROWDSEC_API_KEY", &lapi.bouncer_key)
            .env("PORTCULLIS_CROWDSEC_INTERVAL", "1s")
            .env(key, value),
    )
}

fn l4_answers(port: u16, source: Ipv4Addr) -> bool {
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let Ok(mut s) = tcp_from(source, dst, Duration::from_secs(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(s.read_exact(&mut buf), Ok(())) && &buf == b"ping"
}

#[test]
fn decisions_block_in_enforce_and_are_only_logged_in_observe() {
    let dir = TestDir::new("crowdsec");
    let Some(lapi) = LocalApi::start(&dir) else {
        return;
    };
    let backend = Backend::start("crowdsec");
    let echo = Target::tcp_echo(false);
    let l4_port = free_port();
    let mappings = format!(
        "[[service]]\nid = \"enforce\"\ndomain = \"enforce.test.internal\"\ncrowdsec_mode = \"enforce\"\n\
         [[service.path]]\ntarget = \"http://127.0.0.1:{b}\"\n\n\
         [[service]]\nid = \"observe\"\ndomain = \"observe.test.internal\"\ncrowdsec_mode = \"observe\"\n\
         [[service.path]]\ntarget = \"http://127.0.0.1:{b}\"\n\n\
         [[service]]\nid = \"l4\"\ndomain = \"l4.test.internal\"\nmode = \"tcp\"\nlisten_port = {l4_port}\n\
         crowdsec_mode = \"enforce\"\n[[service.path]]\ntarget = \"{echo}\"\n",
        b = backend.port(),
        echo = echo.addr,
    );
    let p = start_proxy(&lapi, mappings, ("PORTCULLIS_EBPF", "off"));
    p.wait_health("the bouncer connected", |h| {
        h["crowdsec"]["connected"] == true && h["services"] == 3
    });
    let banned = "127.0.0.7";
    let banned_v4 = Ipv4Addr::new(127, 0, 0, 7);
    assert_eq!(status(&p, "enforce.test.internal", banned), 200);
    assert!(l4_answers(l4_port, banned_v4));

    lapi.ban(banned);
    eventually("the ban reaching the proxy", &p, || {
        status(&p, "enforce.test.internal", banned) == 403
    });
    assert_eq!(status(&p, "observe.test.internal", banned), 200);
    // Other addresses are not affected.
    assert_eq!(status(&p, "enforce.test.internal", "127.0.0.1"), 200);
    assert!(
        !l4_answers(l4_port, banned_v4),
        "the L4 port served a banned address"
    );
    assert!(l4_answers(l4_port, Ipv4Addr::new(127, 0, 0, 1)));
    let h = p.health();
    assert!(h["crowdsec"]["decisions"].as_u64().unwrap_or(0) >= 1, "{h}");
    assert!(
        p.log_text().contains("CrowdSec verdict"),
        "the observed verdict is logged"
    );

    lapi.unban(banned);
    eventually("the deletion reaching the proxy", &p, || {
        status(&p, "enforce.test.internal", banned) == 200
    });
    assert!(l4_answers(l4_port, banned_v4));
}

/// A ban reaches the XDP deny map of an `enforce` L4 port: the banned source's SYN is dropped
/// in the kernel (its connect times out and user space never sees it), others pass. XDP runs
/// on loopback here, where the test's sources live.
#[test]
fn bans_reach_the_xdp_deny_map_of_enforcing_ports() {
    let dir = TestDir::new("crowdsec-xdp");
    let Some(lapi) = LocalApi::start(&dir) else {
        return;
    };
    let echo = Target::tcp_echo(false);
    let l4_port = free_port();
    let mappings = format!(
        "[[service]]\nid = \"l4\"\ndomain = \"l4.test.internal\"\nmode = \"tcp\"\nlisten_port = {l4_port}\n\
         crowdsec_mode = \"enforce\"\n[[service.path]]\ntarget = \"{echo}\"\n",
        echo = echo.addr,
    );
    let p = start_proxy(&lapi, mappings, ("PORTCULLIS_XDP_INTERFACES", "lo"));
    if !p.fast_path_on() {
        return;
    }
    let key = format!("{l4_port}/tcp");
    p.wait_health("the bouncer connected and the port in the XDP map", |h| {
        h["crowdsec"]["connected"] == true && h["l4"]["xdp"][&key].is_object()
    });
    let banned = Ipv4Addr::new(127, 0, 0, 9);
    assert!(l4_answers(l4_port, banned));

    lapi.ban(&banned.to_string());
    let dst: SocketAddr = format!("127.0.0.1:{l4_port}").parse().unwrap();
    // Polls until the SYN is dropped rather than answered (≤ 15 s of 1 s attempts).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tcp_from(banned, dst, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the ban never reached the XDP map: {}\n{}",
            p.health(),
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let h = p.health();
    let dropped = h["l4"]["xdp"][&key]["dropped_packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(dropped >= 1, "the SYN was dropped in XDP: {h}");
    let denied_before = h["l4"]["denied"].as_u64().unwrap_or(0);
    assert!(l4_answers(l4_port, Ipv4Addr::new(127, 0, 0, 1)));
    assert!(tcp_from(banned, dst, Duration::from_secs(1)).is_err());
    assert_eq!(
        p.health()["l4"]["denied"].as_u64().unwrap_or(0),
        denied_before,
        "user space never saw the banned source again: XDP dropped it first"
    );

    lapi.unban(&banned.to_string());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !l4_answers(l4_port, banned) {
        assert!(
            Instant::now() < deadline,
            "the deletion never left the XDP map: {}",
            p.health()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
