//! What the agent keeps between runs: who it is at which management. `<state-dir>/agent.json`,
//! mode 0600 in a 0700 folder, replaced atomically (temp file + rename) so a crash mid-write
//! never leaves half a file.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wireguard_control::Key;

pub const FILE_NAME: &str = "agent.json";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub management_url: String,
    pub peer_id: String,
    pub peer_token: String,
    /// Base64, as `wg` prints it.
    pub private_key: String,
}

/// The token and key never reach a log line.
impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("management_url", &self.management_url)
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid agent state ({message}); move it away to register again with a setup key"
    )]
    Corrupt { path: String, message: String },
    #[error("cannot write {path}: {source} — is the state directory writable by this user?")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl AgentState {
    pub fn key(&self) -> Result<Key, StateError> {
        Key::from_base64(&self.private_key).map_err(|_| StateError::Corrupt {
            path: FILE_NAME.to_string(),
            message: "the private key is not base64 of 32 bytes".to_string(),
        })
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// `Ok(None)` when there is no state yet.
pub fn load(dir: &Path) -> Result<Option<AgentState>, StateError> {
    let file = path(dir);
    let show = file.display().to_string();
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path: show, source }),
    };
    let state: AgentState = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
        path: show.clone(),
        message: e.to_string(),
    })?;
    state.key().map_err(|_| StateError::Corrupt {
        path: show,
        message: "the private key is not base64 of 32 bytes".to_string(),
    })?;
    Ok(Some(state))
}

pub fn save(dir: &Path, state: &AgentState) -> Result<(), StateError> {
    let write_err = |p: &Path| {
        let p = p.display().to_string();
        move |source| StateError::Write { path: p, source }
    };
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write_err(dir))?;
    } else if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        // A folder we did not create may be shared (/tmp): warn rather than chmod it.
        tracing::warn!(dir = %dir.display(), "the agent state directory is accessible to other users; make it 0700");
    }
    let file = path(dir);
    let tmp = dir.join(format!(".{FILE_NAME}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let text =
        serde_json::to_vec_pretty(state).map_err(|e| write_err(&tmp)(std::io::Error::other(e)))?;
    let written = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        out.write_all(&text)?;
        out.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(&tmp)(e));
    }
    std::fs::rename(&tmp, &file).map_err(write_err(&file))?;
    // The rename is durable only once the folder is flushed.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Moves the state of a deleted peer aside, so the next start registers again with a setup key
/// instead of failing with the same revoked token.
pub fn retire(dir: &Path) -> Result<PathBuf, StateError> {
    let from = path(dir);
    let to = dir.join(format!("{FILE_NAME}.revoked"));
    std::fs::rename(&from, &to).map_err(|source| StateError::Write {
        path: from.display().to_string(),
        source,
    })?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("pc-agent-state-{}-{n}", std::process::id()))
    }

    #[test]
    fn round_trip_with_private_permissions() {
        let base = temp_dir();
        let dir = base.join("state");
        assert_eq!(load(&dir).expect("no state is fine"), None);
        let state = AgentState {
            management_url: "https://m.example".into(),
            peer_id: "peer-1".into(),
            peer_token: "tok-secret".into(),
            private_key: Key::generate_private().to_base64(),
        };
        save(&dir, &state).expect("save");
        assert_eq!(load(&dir).expect("load"), Some(state.clone()));
        let file_mode = std::fs::metadata(path(&dir))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(!format!("{state:?}").contains("tok-secret"));

        // Overwriting replaces the file and leaves no temp file behind.
        let newer = AgentState {
            peer_id: "peer-2".into(),
            ..state
        };
        save(&dir, &newer).expect("save again");
        assert_eq!(load(&dir).expect("load"), Some(newer));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(FILE_NAME)]);

        std::fs::write(path(&dir), "{not json").expect("corrupt");
        assert!(matches!(load(&dir), Err(StateError::Corrupt { .. })));
        retire(&dir).expect("retire");
        assert_eq!(load(&dir).expect("retired"), None);
        let _ = std::fs::remove_dir_all(base);
    }
}
