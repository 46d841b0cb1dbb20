//! A real CrowdSec Local API on loopback (Debian's package, unpacked by `cargo xtask test` into
//! `target/testbed/crowdsec`), with its own configuration and SQLite database in the test dir.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Supervised, stdout_of};
use crate::proxy::{TestDir, free_port};

pub struct LocalApi {
    _process: Supervised,
    pub url: String,
    pub bouncer_key: String,
    cscli: PathBuf,
    config: PathBuf,
}

fn package_root() -> PathBuf {
    std::env::var_os("PORTCULLIS_TEST_CROWDSEC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/testbed/crowdsec/root")
        })
}

impl LocalApi {
    /// `None` (with the reason printed) when CrowdSec is not unpacked here; in CI that fails.
    pub fn start(dir: &TestDir) -> Option<LocalApi> {
        let root = package_root();
        let bin = root.join("usr/bin/crowdsec");
        if !bin.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CrowdSec is missing at {} in CI: run the tests through `cargo xtask test`",
                root.display()
            );
            eprintln!(
                "skipping: CrowdSec is not unpacked at {} (run `cargo xtask test`)",
                root.display()
            );
            return None;
        }
        let base = dir.0.join("crowdsec");
        for sub in ["data", "hub", "cfg"] {
            std::fs::create_dir_all(base.join(sub)).expect("crowdsec dirs");
        }
        let port = free_port();
        let cfg = base.join("cfg");
        let etc = root.join("etc/crowdsec");
        let config = format!(
            "common:\n  daemonize: false\n  log_media: stdout\n  log_level: info\n  working_dir: {b}\n\
             config_paths:\n  config_dir: {c}/\n  data_dir: {b}/data/\n  simulation_path: {e}/simulation.yaml\n  \
             hub_dir: {b}/hub/\n  index_path: {b}/hub/.index.json\n  notification_dir: {c}/notifications/\n  \
             plugin_dir: {b}/plugins/\n\
             crowdsec_service:\n  acquisition_path: {c}/acquis.yaml\n  parser_routines: 1\n\
             cscli:\n  output: human\n\
             db_config:\n  type: sqlite\n  db_path: {b}/data/crowdsec.db\n  use_wal: false\n\
             api:\n  client:\n    insecure_skip_verify: false\n    credentials_path: {c}/local_api_credentials.yaml\n  \
             server:\n    log_level: info\n    listen_uri: 127.0.0.1:{port}\n    profiles_path: {e}/profiles.yaml\n    \
             trusted_ips:\n      - 127.0.0.1\n\
             prometheus:\n  enabled: false\n",
            b = base.display(),
            c = cfg.display(),
            e = etc.display(),
        );
        let config_path = cfg.join("config.yaml");
        std::fs::write(&config_path, config).expect("crowdsec config");
        std::fs::write(cfg.join("acquis.yaml"), "").expect("acquis");
        let cscli = root.join("usr/bin/cscli");
        let creds = cfg.join("local_api_credentials.yaml");
        stdout_of(
            Command::new(&cscli)
                .arg("-c")
                .arg(&config_path)
                .args(["machines", "add", "-a", "-f"])
                .arg(&creds),
            "cscli machines add",
        );
        let key = String::from_utf8_lossy(&stdout_of(
            Command::new(&cscli).arg("-c").arg(&config_path).args([
                "bouncers",
                "add",
                "portcullis-test",
                "-o",
                "raw",
            ]),
            "cscli bouncers add",
        ))
        .trim()
        .to_string();
        assert!(!key.is_empty(), "cscli printed no bouncer key");
        let process = Supervised::spawn(
            Command::new(&bin).arg("-c").arg(&config_path).arg("-no-cs"),
            "crowdsec",
            base.join("crowdsec.log"),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the CrowdSec Local API did not listen:\n{}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(LocalApi {
            _process: process,
            url,
            bouncer_key: key,
            cscli,
            config: config_path,
        })
    }

    fn cscli(&self, args: &[&str]) {
        stdout_of(
            Command::new(&self.cscli)
                .arg("-c")
                .arg(&self.config)
                .args(args),
            &format!("cscli {args:?}"),
        );
    }

    pub fn ban(&self, ip: &str) {
        self.cscli(&["decisions", "add", "--ip", ip, "--duration", "1h"]);
    }

    pub fn unban(&self, ip: &str) {
        self.cscli(&["decisions", "delete", "--ip", ip]);
    }
}
