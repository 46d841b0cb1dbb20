//! Secrets handed to people and proxies: random ids, proxy tokens (`nbx_…`), personal access
//! tokens (`nbp_…`), setup keys (`pcs_…`), peer tokens (`pcp_…`), one-time proxy-peer tokens
//! (`pco_…`). Only a SHA-256 hash of a token is ever stored; the plain token is shown once.

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of the random part of a token.
const SECRET_LEN: usize = 30;
/// Length of the checksum suffix.
const CHECKSUM_LEN: usize = 6;

pub const PROXY_TOKEN_PREFIX: &str = "nbx_";
pub const PAT_PREFIX: &str = "nbp_";
/// Setup keys with which agents join an account's mesh.
pub const SETUP_KEY_PREFIX: &str = "pcs_";
/// Peer tokens an agent authenticates its `Agent.Sync` stream with.
pub const PEER_TOKEN_PREFIX: &str = "pcp_";
/// One-time tokens in `ProxyMapping.auth_token`, for `CreateProxyPeer`.
pub const PROXY_PEER_TOKEN_PREFIX: &str = "pco_";

pub fn random_base62(len: usize) -> String {
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        // A failing system RNG leaves no safe way to mint secrets.
        rng.fill(&mut buf).expect("system random number generator");
        for &b in &buf {
            // 62 * 4 = 248: rejecting 248..=255 keeps the characters uniform.
            if b < 248 && out.len() < len {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// A random identifier for records (20 base62 characters, ~119 bits).
pub fn new_id() -> String {
    random_base62(20)
}

/// An identifier that sorts by creation time (milliseconds), for rows written at a high rate:
/// 8 base62 characters of time, then 12 random (~71 bits), 20 in all like [`new_id`]. Random
/// keys land on random pages of the primary-key index, so each insert rewrote (and on SQLite
/// re-read) a page of its own; ordered ones all land on the last page.
pub fn new_time_ordered_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut id = base62_fixed(ms, 8);
    id.push_str(&random_base62(12));
    id
}

fn base62_fixed(mut n: u64, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits).unwrap_or_default()
}

fn checksum(secret: &str) -> String {
    base62_fixed(u64::from(crc32(secret.as_bytes())), CHECKSUM_LEN)
}

/// CRC-32 (IEEE), bitwise: tokens are short and minted rarely.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Mints a token: prefix + 30 random base62 characters + 6-character checksum.
pub fn new_token(prefix: &str) -> String {
    let secret = random_base62(SECRET_LEN);
    let sum = checksum(&secret);
    format!("{prefix}{secret}{sum}")
}

/// True when the token has the expected prefix, length and a valid checksum, so that typos
/// are told apart from unknown tokens without a store lookup.
pub fn well_formed(token: &str, prefix: &str) -> bool {
    let Some(rest) = token.strip_prefix(prefix) else {
        return false;
    };
    if rest.len() != SECRET_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (secret, sum) = rest.split_at(SECRET_LEN);
    checksum(secret) == sum
}

/// What is stored for a token: base64 of its SHA-256.
pub fn hash_token(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ordered_ids_sort_by_creation() {
        let first = new_time_ordered_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = new_time_ordered_id();
        assert_eq!((first.len(), second.len()), (20, 20));
        assert!(first < second, "{first} then {second}");
        assert!(second.bytes().all(|b| BASE62.contains(&b)));
        assert_ne!(first[8..], second[8..], "the random part differs");
    }

    #[test]
    fn tokens_have_the_documented_shape() {
        let t = new_token(PROXY_TOKEN_PREFIX);
        assert!(t.starts_with("nbx_"));
        assert_eq!(t.len(), 4 + 30 + 6);
        assert!(well_formed(&t, PROXY_TOKEN_PREFIX));
        assert!(!well_formed(&t, PAT_PREFIX));
        let mut typo = t.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        assert!(!well_formed(
            &String::from_utf8(typo).unwrap(),
            PROXY_TOKEN_PREFIX
        ));
    }

    #[test]
    fn tokens_differ_and_hashes_hide_them() {
        let a = new_token(PAT_PREFIX);
        let b = new_token(PAT_PREFIX);
        assert_ne!(a, b);
        assert_ne!(hash_token(&a), hash_token(&b));
        assert!(!hash_token(&a).contains(&a[4..]));
        assert_eq!(hash_token(&a), hash_token(&a));
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
