//! Credentials that name a tenant: API keys today (the "api_key" source). The config
//! holds only SHA-256 digests (`"sha256:<64 hex>"`); a presented key is hashed and
//! compared in constant time, and keys never appear in logs or metrics.

use std::collections::HashMap;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::snapshot::TenantIdx;

/// A SHA-256 digest of an API key.
pub type KeyDigest = [u8; 32];

/// `sha256:<64 lower-case hex>` for `key`, as `bulkhead hash-key` prints it.
pub fn hash_key(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Parses a configured `api_keys` entry. The messages never quote the entry: one
/// that is not a hash is most likely a key pasted in by mistake, and the message goes
/// to the log, the reload's 422 answer and `GET /config/history` (its position says
/// which entry it is).
pub fn parse_digest(s: &str) -> Result<KeyDigest, String> {
    let hex = s.strip_prefix("sha256:").ok_or_else(|| {
        format!("an api key ({} characters, not quoted here: it may be a key itself) must be \"sha256:<64 hex digits>\" (the config stores only hashes; `bulkhead hash-key` prints one)", s.chars().count())
    })?;
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "an api key (\"sha256:\" and {} characters) must be \"sha256:\" followed by 64 hex digits",
            hex.chars().count()
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| "an api key is not valid hex".to_owned())?;
    }
    Ok(out)
}

/// Every tenant's key digests, probed by their first 8 bytes and then compared whole
/// in constant time.
#[derive(Debug, Default)]
pub struct ApiKeys {
    by_prefix: HashMap<u64, Vec<(KeyDigest, TenantIdx)>, foldhash::fast::RandomState>,
}

impl ApiKeys {
    pub fn insert(&mut self, digest: KeyDigest, tenant: TenantIdx) {
        self.by_prefix
            .entry(prefix(&digest))
            .or_default()
            .push((digest, tenant));
    }

    /// The tenant owning `key`, if any.
    pub fn find(&self, key: &[u8]) -> Option<TenantIdx> {
        let digest: KeyDigest = Sha256::digest(key).into();
        let candidates = self.by_prefix.get(&prefix(&digest))?;
        let mut found = None;
        for (d, t) in candidates {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(*t);
            }
        }
        found
    }
}

fn prefix(d: &KeyDigest) -> u64 {
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_parse_round_trip() {
        let h = hash_key(b"secret-key");
        assert_eq!(h.len(), 71);
        let d = parse_digest(&h).unwrap();
        let mut keys = ApiKeys::default();
        keys.insert(d, 3);
        assert_eq!(keys.find(b"secret-key"), Some(3));
        assert_eq!(keys.find(b"secret-kez"), None);
        assert!(parse_digest("md5:abc").is_err());
        assert!(parse_digest("sha256:abc").is_err());
    }

    #[test]
    fn known_vector() {
        assert_eq!(
            hash_key(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
