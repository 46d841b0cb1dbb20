//! A real CrowdSec Local API for the CrowdSec tests. Debian's `crowdsec` package must not be
//! installed: its post-install step registers with CrowdSec's online service, fails offline and
//! leaves dpkg broken. So the package is downloaded and unpacked into `target/testbed/crowdsec`,
//! and the tests run `crowdsec -no-cs` (the Local API alone) with a configuration of their own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The unpacked package (with `usr/bin/crowdsec`, `usr/bin/cscli`, `etc/crowdsec/`).
pub fn ensure(target: &Path) -> Result<PathBuf> {
    let dir = target.join("testbed/crowdsec");
    let root = dir.join("root");
    if root.join("usr/bin/crowdsec").exists() && root.join("usr/bin/cscli").exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    if !crate::is_root() {
        eprintln!("==> CrowdSec is not unpacked and this is not root: its tests will skip");
        return Ok(root);
    }
    eprintln!("==> downloading Debian's crowdsec package (unpacked, not installed)");
    let status = Command::new("apt-get")
        .args(["download", "crowdsec"])
        .current_dir(&dir)
        .status()
        .context("apt-get download crowdsec")?;
    if !status.success() {
        // The package lists may be missing on a fresh machine.
        crate::run(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        )?;
        crate::run(
            "apt-get download crowdsec",
            Command::new("apt-get")
                .args(["download", "crowdsec"])
                .current_dir(&dir),
        )?;
    }
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no crowdsec .deb after apt-get download")?;
    crate::run(
        "dpkg-deb -x crowdsec",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
    )?;
    if !root.join("usr/bin/crowdsec").exists() {
        bail!("the crowdsec package has no usr/bin/crowdsec");
    }
    Ok(root)
}
