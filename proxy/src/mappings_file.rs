//! The mappings file: services described in TOML, served without a management server.
//!
//! The file is turned into the protocol's own `ProxyMapping`s, so the route table cannot tell
//! whether a service came from a file or from management.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use proto::{PathMapping, PathRewriteMode, PathTargetOptions, ProxyMapping};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum MappingsFileError {
    #[error("cannot read mappings file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("mappings file {path} is not valid TOML for Portcullis: {message}")]
    Syntax { path: String, message: String },
    #[error("mappings file {path}: service {service:?}: {message}")]
    Invalid {
        path: String,
        service: String,
        message: String,
    },
}

/// Files larger than this are refused: a mappings file is configuration, not data.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default, rename = "service")]
    services: Vec<FileService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    id: String,
    #[serde(default)]
    account_id: String,
    domain: String,
    #[serde(default)]
    pass_host_header: bool,
    #[serde(default)]
    rewrite_redirects: bool,
    /// http (the default), tcp, udp or tls.
    #[serde(default)]
    mode: Option<String>,
    /// The port of a tcp, udp or tls service.
    #[serde(default)]
    listen_port: u16,
    #[serde(default)]
    allowed_cidrs: Vec<String>,
    #[serde(default)]
    blocked_cidrs: Vec<String>,
    /// ISO 3166-1 alpha-2 codes; need the country database of `NB_PROXY_GEO_DATA_DIR`.
    #[serde(default)]
    allowed_countries: Vec<String>,
    #[serde(default)]
    blocked_countries: Vec<String>,
    /// off (default), enforce or observe: needs NB_PROXY_CROWDSEC_API_URL.
    #[serde(default)]
    crowdsec_mode: String,
    #[serde(default, rename = "path")]
    paths: Vec<FilePath>,
    /// Sessions issued elsewhere (a management this proxy does not talk to, a bench): the
    /// proxy verifies `nb_session` cookies with `session_key`; without management nobody can
    /// sign in here, so only holders of a valid session (or nobody) get through.
    #[serde(default)]
    auth: Option<FileAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    /// Base64 Ed25519 public key the session tokens are signed with.
    session_key: String,
    #[serde(default)]
    max_session_age_seconds: i64,
    #[serde(default)]
    password: bool,
    #[serde(default)]
    pin: bool,
    #[serde(default)]
    oidc: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePath {
    #[serde(default = "root_path")]
    path: String,
    target: String,
    #[serde(default)]
    skip_tls_verify: bool,
    #[serde(default)]
    request_timeout: Option<String>,
    #[serde(default)]
    path_rewrite: Option<String>,
    #[serde(default)]
    custom_headers: BTreeMap<String, String>,
    /// L4: send a PROXY protocol v2 header to the target.
    #[serde(default)]
    proxy_protocol: bool,
    /// UDP: reap a session idle this long.
    #[serde(default)]
    session_idle_timeout: Option<String>,
}

fn root_path() -> String {
    "/".to_string()
}

/// Reads and validates a mappings file.
pub fn load(path: &Path) -> Result<Vec<ProxyMapping>, MappingsFileError> {
    let display = path.display().to_string();
    let read_err = |source| MappingsFileError::Read {
        path: display.clone(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(MappingsFileError::Syntax {
            path: display,
            message: format!("file is {len} bytes, more than the {MAX_FILE_BYTES} allowed"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_str(&text, &display)
}

/// Parses mappings-file text; `origin` names the source in error messages.
pub fn parse_str(text: &str, origin: &str) -> Result<Vec<ProxyMapping>, MappingsFileError> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| MappingsFileError::Syntax {
        path: origin.to_string(),
        message: e.to_string(),
    })?;
    let mut ids = HashSet::new();
    let mut domains = HashSet::new();
    let mut out = Vec::with_capacity(doc.services.len());
    for svc in doc.services {
        let invalid = |message: String| MappingsFileError::Invalid {
            path: origin.to_string(),
            service: svc.id.clone(),
            message,
        };
        if svc.id.trim().is_empty() {
            return Err(invalid("`id` must not be empty".to_string()));
        }
        if !ids.insert(svc.id.clone()) {
            return Err(invalid(
                "the same id is used by another service".to_string(),
            ));
        }
        let domain = svc.domain.trim().trim_end_matches('.').to_ascii_lowercase();
        crate::routes::validate_domain(&domain).map_err(|m| invalid(m.to_string()))?;
        if !domains.insert(domain.clone()) {
            return Err(invalid(format!(
                "domain {domain} is already used by another service"
            )));
        }
        if svc.paths.is_empty() {
            return Err(invalid(
                "at least one [[service.path]] with a target is needed".to_string(),
            ));
        }
        let mut seen_paths = HashSet::new();
        let mut paths = Vec::with_capacity(svc.paths.len());
        for p in &svc.paths {
            if !seen_paths.insert(p.path.as_str()) {
                return Err(invalid(format!("path {:?} is listed twice", p.path)));
            }
            paths.push(to_path_mapping(p).map_err(invalid)?);
        }
        let mode = svc.mode.clone().unwrap_or_else(|| "http".to_string());
        let l4_mode = crate::routes::L4Mode::parse(&mode);
        if l4_mode.is_none() && mode != "http" {
            return Err(invalid(format!(
                "mode {mode:?} must be http, tcp, udp or tls"
            )));
        }
        if l4_mode.is_none() && svc.listen_port != 0 {
            return Err(invalid(
                "listen_port is only for tcp, udp and tls services".into(),
            ));
        }
        let restricted = !svc.allowed_cidrs.is_empty()
            || !svc.blocked_cidrs.is_empty()
            || !svc.allowed_countries.is_empty()
            || !svc.blocked_countries.is_empty()
            || !svc.crowdsec_mode.is_empty();
        let mapping = ProxyMapping {
            id: svc.id.clone(),
            account_id: svc.account_id.clone(),
            domain,
            path: paths,
            pass_host_header: svc.pass_host_header,
            rewrite_redirects: svc.rewrite_redirects,
            mode,
            listen_port: i32::from(svc.listen_port),
            access_restrictions: restricted.then(|| proto::AccessRestrictions {
                allowed_cidrs: svc.allowed_cidrs.clone(),
                blocked_cidrs: svc.blocked_cidrs.clone(),
                allowed_countries: svc.allowed_countries.clone(),
                blocked_countries: svc.blocked_countries.clone(),
                crowdsec_mode: svc.crowdsec_mode.clone(),
            }),
            auth: svc.auth.as_ref().map(|a| proto::Authentication {
                session_key: a.session_key.clone(),
                max_session_age_seconds: a.max_session_age_seconds,
                // A file service with auth but no method named still demands a session.
                password: a.password || !(a.pin || a.oidc),
                pin: a.pin,
                oidc: a.oidc,
                header_auths: Vec::new(),
            }),
            ..Default::default()
        };
        // Catch every error the route builder would raise, so a bad file never half-applies.
        match l4_mode {
            Some(m) => crate::routes::L4Service::from_mapping(&mapping, m).map(drop),
            None => crate::routes::Service::from_mapping(&mapping).map(drop),
        }
        .map_err(|e| invalid(e.to_string()))?;
        out.push(mapping);
    }
    // Two L4 services on one port: the file is wrong, so say so now rather than refuse one
    // service at run time.
    let l4: Vec<crate::routes::L4Service> = out
        .iter()
        .filter_map(|m| {
            let mode = crate::routes::L4Mode::parse(&m.mode)?;
            crate::routes::L4Service::from_mapping(m, mode).ok()
        })
        .collect();
    let (_, refused) = crate::routes::L4Table::build(l4, &Default::default(), &[]);
    if let Some((service, e)) = refused.into_iter().next() {
        return Err(MappingsFileError::Invalid {
            path: origin.to_string(),
            service,
            message: e.to_string(),
        });
    }
    Ok(out)
}

fn to_path_mapping(p: &FilePath) -> Result<PathMapping, String> {
    let request_timeout = optional_duration("request_timeout", p.request_timeout.as_deref())?;
    let path_rewrite = match p.path_rewrite.as_deref() {
        None | Some("default") | Some("strip") => PathRewriteMode::PathRewriteDefault,
        Some("preserve") => PathRewriteMode::PathRewritePreserve,
        Some(other) => {
            return Err(format!(
                "path_rewrite {other:?} must be \"strip\" (the default) or \"preserve\""
            ));
        }
    };
    let session_idle_timeout =
        optional_duration("session_idle_timeout", p.session_idle_timeout.as_deref())?;
    Ok(PathMapping {
        path: p.path.clone(),
        target: p.target.clone(),
        options: Some(PathTargetOptions {
            skip_tls_verify: p.skip_tls_verify,
            request_timeout,
            path_rewrite: path_rewrite as i32,
            custom_headers: p.custom_headers.clone().into_iter().collect(),
            proxy_protocol: p.proxy_protocol,
            session_idle_timeout,
            ..Default::default()
        }),
    })
}

fn optional_duration(
    key: &str,
    value: Option<&str>,
) -> Result<Option<prost_types::Duration>, String> {
    value
        .map(|s| {
            humantime::parse_duration(s)
                .map(prost_types_duration)
                .map_err(|e| format!("{key} {s:?} is not a duration: {e}"))
        })
        .transpose()
}

fn prost_types_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[service]]
id = "app"
domain = "App.Example.com."
rewrite_redirects = true

[[service.path]]
path = "/"
target = "http://127.0.0.1:8080"

[[service.path]]
path = "/api"
target = "https://10.0.0.2:8443/v1"
skip_tls_verify = true
request_timeout = "5s"
path_rewrite = "preserve"
custom_headers = { "X-Env" = "prod" }
"#;

    #[test]
    fn parses_into_protocol_mappings() {
        let m = parse_str(GOOD, "test").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].domain, "app.example.com");
        assert!(m[0].rewrite_redirects);
        let api = &m[0].path[1];
        let opts = api.options.as_ref().unwrap();
        assert_eq!(
            opts.path_rewrite,
            PathRewriteMode::PathRewritePreserve as i32
        );
        assert_eq!(opts.request_timeout.as_ref().unwrap().seconds, 5);
        assert_eq!(opts.custom_headers["X-Env"], "prod");
    }

    #[test]
    fn l4_services() {
        let text = r#"
[[service]]
id = "db"
domain = "db.example"
mode = "tcp"
listen_port = 5432
blocked_cidrs = ["10.9.0.0/16"]
[[service.path]]
target = "10.0.0.5:5432"
proxy_protocol = true

[[service]]
id = "dns"
domain = "dns.example"
mode = "udp"
listen_port = 53
[[service.path]]
target = "10.0.0.6:53"
session_idle_timeout = "5s"
"#;
        let m = parse_str(text, "f").unwrap();
        assert_eq!(m[0].listen_port, 5432);
        assert!(m[0].path[0].options.as_ref().unwrap().proxy_protocol);
        assert_eq!(
            m[0].access_restrictions.as_ref().unwrap().blocked_cidrs,
            vec!["10.9.0.0/16"]
        );
        let idle = m[1].path[0].options.as_ref().unwrap();
        assert_eq!(idle.session_idle_timeout.unwrap().seconds, 5);
        let no_port = text.replace("listen_port = 5432\n", "");
        assert!(parse_str(&no_port, "f").is_err());
        let same_port = text.replace("listen_port = 53\n", "listen_port = 5432\n");
        assert!(
            parse_str(&same_port, "f").is_ok(),
            "tcp and udp may share a number"
        );
        let clash = same_port.replace("\"udp\"", "\"tcp\"");
        let e = parse_str(&clash, "f").unwrap_err().to_string();
        assert!(e.contains("already used"), "{e}");
        let bad_mode = text.replace("\"tcp\"", "\"sctp\"");
        assert!(
            parse_str(&bad_mode, "f")
                .unwrap_err()
                .to_string()
                .contains("sctp")
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse_str("[[service]]\nid='a'\ndomain='a.b'\ntypo=1\n", "f").unwrap_err();
        assert!(e.to_string().contains("typo"), "{e}");
    }

    #[test]
    fn duplicate_domains_and_ids_are_errors() {
        let one = "[[service]]\nid='a'\ndomain='a.example'\n[[service.path]]\ntarget='http://127.0.0.1:1'\n";
        let dup_id = format!("{one}{}", one.replace("a.example", "b.example"));
        assert!(
            parse_str(&dup_id, "f")
                .unwrap_err()
                .to_string()
                .contains("id")
        );
        let dup_domain = format!("{one}{}", one.replace("id='a'", "id='b'"));
        assert!(
            parse_str(&dup_domain, "f")
                .unwrap_err()
                .to_string()
                .contains("already used")
        );
    }

    #[test]
    fn bad_targets_name_the_service() {
        let text = "[[service]]\nid='x'\ndomain='x.example'\n[[service.path]]\ntarget='ftp://h'\n";
        let e = parse_str(text, "f").unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    GOOD.as_bytes()[(seed as usize) % GOOD.len()]
                })
                .collect();
            let _ = parse_str(&String::from_utf8_lossy(&bytes), "fuzz");
        }
    }
}
