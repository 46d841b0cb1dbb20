//! A service's protection as users write it (NetBird's `ServiceAuthConfig` and
//! `AccessRestrictions`), validated; the secrets in it are hashed before anything is stored.

use serde::{Deserialize, Serialize};

use super::{Invalid, invalid};

/// `auth` of a service request. Secrets arrive in plain text and are cleared in responses; an
/// enabled method whose secret is left empty keeps the one stored before.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    #[serde(default)]
    pub password_auth: Option<PasswordAuth>,
    #[serde(default)]
    pub pin_auth: Option<PinAuth>,
    #[serde(default)]
    pub header_auths: Vec<HeaderAuthRequest>,
    /// Single sign-on through the account's identity provider.
    #[serde(default)]
    pub bearer_auth: Option<BearerAuth>,
    #[serde(default)]
    pub link_auth: Option<serde_json::Value>,
    /// Ours: how long a session lasts (default a day).
    #[serde(default)]
    pub max_session_age_seconds: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordAuth {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub password: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinAuth {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub pin: String,
}

/// NetBird's `bearer_auth`: SSO on or off, and the groups (ids) whose members may pass; no
/// groups lets in anyone the identity provider signs in.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BearerAuth {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub distribution_groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderAuthRequest {
    #[serde(default = "super::yes")]
    pub enabled: bool,
    pub header: String,
    #[serde(default)]
    pub value: String,
}

/// What is validated: which methods are on and the plain secrets given (empty: keep).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInput {
    pub password: Option<String>,
    pub pin: Option<String>,
    /// (header name, value; empty value: keep the stored one for that header).
    pub headers: Vec<(String, String)>,
    /// `None`: keep the stored age on an update (clients that do not know this extension leave
    /// it out), else [`DEFAULT_SESSION_AGE`].
    pub max_session_age_secs: Option<i64>,
    /// Single sign-on: the group ids allowed in (empty: anyone), `None` when off.
    pub sso_groups: Option<Vec<String>>,
}

impl AuthInput {
    pub fn any(&self) -> bool {
        self.password.is_some()
            || self.pin.is_some()
            || !self.headers.is_empty()
            || self.sso_groups.is_some()
    }
}

/// Most groups one service may name.
const MAX_SSO_GROUPS: usize = 100;

pub const DEFAULT_SESSION_AGE: i64 = 24 * 60 * 60;
const MAX_SESSION_AGE: i64 = 30 * 24 * 60 * 60;

/// Headers a proxy manages itself or that carry other things than credentials.
const UNUSABLE_HEADERS: &[&str] = &[
    "host",
    "cookie",
    "connection",
    "content-length",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "x-forwarded-for",
    "x-netbird-user",
    "x-netbird-groups",
];

impl AuthRequest {
    pub fn validate(self) -> Result<AuthInput, Invalid> {
        let sso_groups = match self.bearer_auth {
            Some(b) if b.enabled => {
                let mut groups: Vec<String> = Vec::new();
                for g in b.distribution_groups {
                    let g = g.trim().to_string();
                    if g.is_empty() || g.len() > 64 {
                        return invalid("auth.bearer_auth.distribution_groups holds group ids");
                    }
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
                if groups.len() > MAX_SSO_GROUPS {
                    return invalid(format!(
                        "auth.bearer_auth.distribution_groups: at most {MAX_SSO_GROUPS} groups"
                    ));
                }
                Some(groups)
            }
            _ => None,
        };
        if self
            .link_auth
            .as_ref()
            .is_some_and(|b| b["enabled"] == true)
        {
            return invalid("link_auth is not supported by this management server");
        }
        let password = match self.password_auth {
            Some(p) if p.enabled => {
                if !p.password.is_empty() && !(8..=256).contains(&p.password.chars().count()) {
                    return invalid("auth.password_auth.password must be 8 to 256 characters");
                }
                Some(p.password)
            }
            _ => None,
        };
        let pin = match self.pin_auth {
            Some(p) if p.enabled => {
                let well_formed =
                    (4..=12).contains(&p.pin.len()) && p.pin.bytes().all(|b| b.is_ascii_digit());
                if !p.pin.is_empty() && !well_formed {
                    return invalid("auth.pin_auth.pin must be 4 to 12 digits");
                }
                Some(p.pin)
            }
            _ => None,
        };
        let mut headers = Vec::new();
        for (i, h) in self.header_auths.into_iter().enumerate() {
            if !h.enabled {
                continue;
            }
            let name = h.header.trim().to_string();
            let ok_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !ok_name {
                return invalid(format!(
                    "auth.header_auths[{i}].header {name:?} is not a valid header name"
                ));
            }
            if UNUSABLE_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return invalid(format!(
                    "auth.header_auths[{i}].header {name:?} cannot carry credentials"
                ));
            }
            if h.value.len() > 4096 || h.value.bytes().any(|b| b < 0x20 && b != b'\t') {
                return invalid(format!(
                    "auth.header_auths[{i}].value must be at most 4096 printable characters"
                ));
            }
            headers.push((name, h.value));
        }
        let age = self.max_session_age_seconds;
        if age.is_some_and(|age| !(1..=MAX_SESSION_AGE).contains(&age)) {
            return invalid(format!(
                "auth.max_session_age_seconds must be 1 to {MAX_SESSION_AGE}"
            ));
        }
        Ok(AuthInput {
            password,
            pin,
            headers,
            max_session_age_secs: age,
            sso_groups,
        })
    }
}

/// What a service's `auth` shows to users: which methods are on, never a secret.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthSummary {
    pub password_auth: Enabled,
    pub pin_auth: Enabled,
    pub header_auths: Vec<HeaderSummary>,
    #[serde(default)]
    pub bearer_auth: BearerAuth,
    pub max_session_age_seconds: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enabled {
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeaderSummary {
    pub enabled: bool,
    pub header: String,
}

impl AuthSummary {
    pub fn of(input: &AuthInput) -> Self {
        Self {
            password_auth: Enabled {
                enabled: input.password.is_some(),
            },
            pin_auth: Enabled {
                enabled: input.pin.is_some(),
            },
            header_auths: input
                .headers
                .iter()
                .map(|(h, _)| HeaderSummary {
                    enabled: true,
                    header: h.clone(),
                })
                .collect(),
            bearer_auth: BearerAuth {
                enabled: input.sso_groups.is_some(),
                distribution_groups: input.sso_groups.clone().unwrap_or_default(),
            },
            max_session_age_seconds: input.max_session_age_secs.unwrap_or(DEFAULT_SESSION_AGE),
        }
    }
}

/// `access_restrictions` of a service (stored in its spec, normalised).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Restrictions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_countries: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_countries: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crowdsec_mode: String,
}

impl Restrictions {
    pub fn validate(mut self) -> Result<Self, Invalid> {
        for (what, list) in [
            ("allowed_cidrs", &mut self.allowed_cidrs),
            ("blocked_cidrs", &mut self.blocked_cidrs),
        ] {
            for c in list.iter_mut() {
                let t = c.trim().to_string();
                let net = t
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                match net {
                    Ok(n) => *c = n.trunc().to_string(),
                    Err(_) => {
                        return invalid(format!(
                            "access_restrictions.{what}: {t:?} is not a CIDR or IP address"
                        ));
                    }
                }
            }
        }
        for (what, list) in [
            ("allowed_countries", &mut self.allowed_countries),
            ("blocked_countries", &mut self.blocked_countries),
        ] {
            for c in list.iter_mut() {
                let t = c.trim().to_ascii_uppercase();
                if t.len() != 2 || !t.bytes().all(|b| b.is_ascii_uppercase()) {
                    return invalid(format!(
                        "access_restrictions.{what}: {c:?} is not an ISO 3166-1 alpha-2 code"
                    ));
                }
                *c = t;
            }
        }
        if !matches!(
            self.crowdsec_mode.as_str(),
            "" | "off" | "enforce" | "observe"
        ) {
            return invalid("access_restrictions.crowdsec_mode must be off, enforce or observe");
        }
        if self.crowdsec_mode == "off" {
            self.crowdsec_mode.clear();
        }
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn to_proto(&self) -> proto::AccessRestrictions {
        proto::AccessRestrictions {
            allowed_cidrs: self.allowed_cidrs.clone(),
            blocked_cidrs: self.blocked_cidrs.clone(),
            allowed_countries: self.allowed_countries.clone(),
            blocked_countries: self.blocked_countries.clone(),
            crowdsec_mode: self.crowdsec_mode.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: serde_json::Value) -> Result<AuthInput, Invalid> {
        serde_json::from_value::<AuthRequest>(v).unwrap().validate()
    }

    #[test]
    fn methods_and_secrets() {
        let a = auth(serde_json::json!({
            "password_auth": {"enabled": true, "password": "long enough"},
            "pin_auth": {"enabled": false, "pin": "12"},
            "header_auths": [{"enabled": true, "header": "X-API-Key", "value": "k"},
                             {"enabled": false, "header": "bad name", "value": ""}],
        }))
        .unwrap();
        assert_eq!(a.password.as_deref(), Some("long enough"));
        assert_eq!(a.pin, None);
        assert_eq!(a.headers, vec![("X-API-Key".into(), "k".into())]);
        let s = serde_json::to_string(&AuthSummary::of(&a)).unwrap();
        assert!(!s.contains("long enough") && !s.contains("\"k\""), "{s}");
    }

    #[test]
    fn bad_input_is_named() {
        for (v, needle) in [
            (
                serde_json::json!({"pin_auth": {"enabled": true, "pin": "12ab"}}),
                "4 to 12 digits",
            ),
            (
                serde_json::json!({"password_auth": {"enabled": true, "password": "short"}}),
                "8 to 256",
            ),
            (
                serde_json::json!({"header_auths": [{"header": "Cookie", "value": "x"}]}),
                "cannot carry",
            ),
            (
                serde_json::json!({"bearer_auth": {"enabled": true, "distribution_groups": [""]}}),
                "group ids",
            ),
            (
                serde_json::json!({"max_session_age_seconds": 0}),
                "max_session_age_seconds",
            ),
        ] {
            let e = auth(v).unwrap_err();
            assert!(e.0.contains(needle), "{}", e.0);
        }
    }

    #[test]
    fn restrictions_are_normalised() {
        let r = Restrictions {
            allowed_cidrs: vec!["10.1.2.3/8".into()],
            blocked_countries: vec!["de".into()],
            crowdsec_mode: "off".into(),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(r.allowed_cidrs, vec!["10.0.0.0/8".to_string()]);
        assert_eq!(r.blocked_countries, vec!["DE".to_string()]);
        assert!(r.crowdsec_mode.is_empty());
        assert!(
            Restrictions {
                blocked_cidrs: vec!["nope".into()],
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
