//! A private two-namespace network for a test: the proxy's namespace and the clients'
//! namespace joined by a veth pair, created with iproute2 and deleted when dropped (also when
//! the test fails). Nothing in them can reach the host's own network.
//!
//! Without root the same tests run on loopback (`Net::loopback`), so they still check the
//! proxy's behaviour, only not across an interface.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The proxy side's address inside the namespaces.
pub const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Two client source addresses, so tests can tell an allowed from a blocked source.
pub const CLIENT_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3)];

pub struct Net {
    /// None on loopback.
    names: Option<Names>,
    pub proxy_ip: Ipv4Addr,
    pub client_ips: [Ipv4Addr; 2],
}

struct Names {
    proxy_ns: String,
    client_ns: String,
    proxy_if: String,
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `ip` with `args`; the error names the command and what `ip` said.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Namespaces when root, else loopback (saying so).
    pub fn new(label: &str) -> Net {
        if !is_root() {
            eprintln!("{label}: not root, so no network namespaces: running on loopback");
            return Net::loopback();
        }
        match Net::namespaces() {
            Ok(n) => n,
            Err(e) => panic!("{label}: cannot create network namespaces as root: {e}"),
        }
    }

    pub fn loopback() -> Net {
        Net {
            names: None,
            proxy_ip: Ipv4Addr::LOCALHOST,
            client_ips: [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)],
        }
    }

    /// Two fresh namespaces and a veth pair between them.
    pub fn namespaces() -> Result<Net, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let names = Names {
            proxy_ns: format!("pcp{tag}"),
            client_ns: format!("pcc{tag}"),
            proxy_if: format!("pv{tag}"),
        };
        let client_if = format!("cv{tag}");
        let net = Net {
            names: Some(names),
            proxy_ip: PROXY_IP,
            client_ips: CLIENT_IPS,
        };
        let n = net.names.as_ref().expect("just set");
        ip(&["netns", "add", &n.proxy_ns])?;
        ip(&["netns", "add", &n.client_ns])?;
        ip(&[
            "link",
            "add",
            &n.proxy_if,
            "netns",
            &n.proxy_ns,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &n.client_ns,
        ])?;
        let in_ns = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(
            &n.proxy_ns,
            &["addr", "add", "10.77.0.1/24", "dev", &n.proxy_if],
        )?;
        in_ns(&n.proxy_ns, &["link", "set", &n.proxy_if, "up"])?;
        in_ns(&n.proxy_ns, &["link", "set", "lo", "up"])?;
        in_ns(
            &n.client_ns,
            &["addr", "add", "10.77.0.2/24", "dev", &client_if],
        )?;
        in_ns(
            &n.client_ns,
            &["addr", "add", "10.77.0.3/24", "dev", &client_if],
        )?;
        in_ns(&n.client_ns, &["link", "set", &client_if, "up"])?;
        in_ns(&n.client_ns, &["link", "set", "lo", "up"])?;
        Ok(net)
    }

    pub fn is_namespaced(&self) -> bool {
        self.names.is_some()
    }

    /// The proxy's namespace, when namespaced.
    pub fn proxy_ns(&self) -> Option<String> {
        self.names.as_ref().map(|n| n.proxy_ns.clone())
    }

    /// The proxy's interface (the one XDP attaches to), when namespaced.
    pub fn proxy_interface(&self) -> Option<&str> {
        self.names.as_ref().map(|n| n.proxy_if.as_str())
    }

    /// Runs `f` on a thread inside the proxy's namespace: sockets it creates stay there.
    pub fn in_proxy_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(self.names.as_ref().map(|n| n.proxy_ns.clone()), f)
    }

    /// Runs `f` on a thread inside the clients' namespace.
    pub fn in_client_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(self.names.as_ref().map(|n| n.client_ns.clone()), f)
    }
}

/// Runs `f` on a thread inside namespace `ns` (the caller's own when None).
pub fn run_in<T: Send + 'static>(ns: Option<String>, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(n) = &self.names {
            // Deleting a namespace deletes the veth end in it, and with it the pair.
            let _ = ip(&["netns", "del", &n.proxy_ns]);
            let _ = ip(&["netns", "del", &n.client_ns]);
        }
    }
}
