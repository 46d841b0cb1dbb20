//! Real interfaces: these need root and wireguard-go, and skip (saying why) without them.

use super::*;

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    if cmd::run("wireguard-go", &["--version"], None).is_err() {
        return Some("wireguard-go is not installed".into());
    }
    None
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

#[test]
fn names_are_short_and_distinct() {
    let a = unique_interface_name("pca");
    let b = unique_interface_name("pca");
    assert_ne!(a, b);
    assert!(a.starts_with("pca") && a.len() <= 15, "{a}");
    let long = unique_interface_name("a-very-long-prefix-indeed");
    assert!(long.len() <= 15, "{long}");
    assert!(long.parse::<InterfaceName>().is_ok(), "{long}");
}

#[test]
fn describe_reads_like_a_sentence() {
    let e = std::io::Error::from_raw_os_error(libc::EOPNOTSUPP);
    assert_eq!(describe(&e), "operation not supported");
}

#[test]
fn tun_device_lifecycle() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped tun_device_lifecycle: {reason}");
        return;
    }
    let name = unique_interface_name("pct");
    let spec = DeviceSpec {
        name: name.clone(),
        private_key: Key::generate_private(),
        listen_port: 0,
        address: net("100.64.0.1/10"),
    };
    let device = WgDevice::create(&spec, BackendChoice::Tun).expect("device");
    assert_eq!(device.backend(), DeviceBackend::Tun);
    assert_ne!(device.listen_port(), 0, "the random port is read back");
    assert!(device.ifindex() > 0);

    let addrs = cmd::run("ip", &["-o", "address", "show", "dev", &name], None).expect("ip");
    assert!(addrs.contains("100.64.0.1/10"), "{addrs}");
    let wg = cmd::run("wg", &["show", &name], None).expect("wg show");
    assert!(
        wg.contains(&format!("listening port: {}", device.listen_port())),
        "{wg}"
    );
    let rp = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"))
        .expect("rp_filter");
    assert_eq!(rp.trim(), "0");

    let peer = Key::generate_private().get_public();
    let routed = net("198.18.77.0/24");
    device
        .set_peers(&[PeerSpec {
            public_key: peer.clone(),
            allowed_ips: vec![net("100.64.0.2/32"), routed],
            endpoint: Some("192.0.2.1:51820".parse().expect("addr")),
            persistent_keepalive: Some(25),
            preshared_key: None,
        }])
        .expect("set peers");
    let peers = device.peers().expect("peers");
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, peer);
    assert_eq!(
        peers[0].endpoint,
        Some("192.0.2.1:51820".parse().expect("addr"))
    );
    let routes = cmd::run("ip", &["-4", "route", "show", "dev", &name], None).expect("ip route");
    assert!(routes.contains("198.18.77.0/24"), "{routes}");
    assert!(
        !routes.contains("100.64.0.2"),
        "inside the own prefix: {routes}"
    );

    device.set_peers(&[]).expect("clear peers");
    assert!(device.peers().expect("peers").is_empty());
    let routes = cmd::run("ip", &["-4", "route", "show", "dev", &name], None).expect("ip route");
    assert!(!routes.contains("198.18.77.0/24"), "{routes}");

    drop(device);
    assert!(interface_index(&name).is_none(), "interface {name} is gone");
    assert!(
        !wggo::socket_path(&name).exists(),
        "socket of {name} is gone"
    );
}

#[test]
fn auto_falls_back_to_tun_and_kernel_says_why() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped auto_falls_back_to_tun_and_kernel_says_why: {reason}");
        return;
    }
    let spec = DeviceSpec {
        name: unique_interface_name("pct"),
        private_key: Key::generate_private(),
        listen_port: 0,
        address: net("100.64.0.9/10"),
    };
    match kernel_wireguard_available() {
        Ok(()) => {
            let device = WgDevice::create(&spec, BackendChoice::Kernel).expect("kernel device");
            assert_eq!(device.backend(), DeviceBackend::Kernel);
        }
        Err(reason) => {
            assert!(reason.starts_with("no kernel WireGuard: "), "{reason}");
            let err = WgDevice::create(&spec, BackendChoice::Kernel)
                .err()
                .expect("kernel refused");
            assert!(matches!(err, DeviceError::KernelUnavailable(_)), "{err}");
            let device = WgDevice::create(&spec, BackendChoice::Auto).expect("auto device");
            assert_eq!(device.backend(), DeviceBackend::Tun);
        }
    }
}
