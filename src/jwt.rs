//! The "jwt" source: a bearer token verified with the keys of the tenant its
//! `tenant_claim` names (HS256 secrets, RS/ES/EdDSA public keys in PEM), or with one
//! issuer's JWKS for all tenants. The algorithm comes from the key, never from the
//! token alone: `alg: none`, or a token signed with an algorithm its key was not
//! configured for, never verifies.

use std::path::Path;

use base64::Engine as _;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use toml::Spanned;

use crate::error::ProxyError;
use crate::units::Dur;

/// `[tenancy.jwt]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    pub header: Spanned<String>,
    /// A cookie that carries the bare token, read when the header has none.
    pub cookie: Option<Spanned<String>>,
    pub tenant_claim: Spanned<String>,
    pub leeway: Spanned<Dur>,
    pub issuer: Option<Spanned<String>>,
    pub audience: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            header: Spanned::new(0..0, "authorization".to_owned()),
            cookie: None,
            tenant_claim: Spanned::new(0..0, "tenant".to_owned()),
            leeway: Spanned::new(0..0, Dur(std::time::Duration::from_secs(30))),
            issuer: None,
            audience: None,
            jwks_file: None,
        }
    }
}

/// `[tenants.X.jwt]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantJwtConfig {
    pub hs256_secret_env: Option<Spanned<String>>,
    pub hs256_secret_file: Option<Spanned<String>>,
    #[serde(default)]
    pub public_keys: Vec<Spanned<String>>,
    /// A JWKS document with the tenant's keys (each with `alg`), re-read on reload.
    pub jwks_file: Option<Spanned<String>>,
    pub issuer: Option<Spanned<String>>,
    pub audience: Option<Spanned<String>>,
    #[serde(default)]
    pub forward_claims: std::collections::BTreeMap<String, Spanned<String>>,
}

/// Key material read while validating, so a reload re-reads every file.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    Hs256Secret(Vec<u8>),
    /// A PEM public key (RSA, EC or Ed25519).
    Pem(Vec<u8>),
    /// A JWKS document.
    Jwks(String),
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        match self {
            KeyMaterial::Hs256Secret(_) => f.write_str("Hs256Secret(..)"),
            KeyMaterial::Pem(_) => f.write_str("Pem(..)"),
            KeyMaterial::Jwks(_) => f.write_str("Jwks(..)"),
        }
    }
}

/// Verified-token settings of one tenant (or of the issuer shared by all), as
/// validated from the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedJwt {
    pub keys: Vec<KeyMaterial>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// (claim, header)
    pub forward_claims: Vec<(String, String)>,
}

/// Reads the key material a `[tenants.X.jwt]` names; paths are relative to `base`.
pub fn load_tenant_keys(
    c: &TenantJwtConfig,
    base: &Path,
) -> Result<Vec<KeyMaterial>, (std::ops::Range<usize>, String)> {
    let mut keys = Vec::new();
    if let Some(env) = &c.hs256_secret_env {
        match std::env::var(env.get_ref()) {
            Ok(v) if !v.is_empty() => {
                let what = format!("the secret in {:?} (hs256_secret_env)", env.get_ref());
                long_enough(v.as_bytes(), &what).map_err(|m| (env.span(), m))?;
                keys.push(KeyMaterial::Hs256Secret(v.into_bytes()))
            }
            _ => {
                return Err((
                    env.span(),
                    format!(
                        "environment variable {:?} (hs256_secret_env) is not set or empty",
                        env.get_ref()
                    ),
                ))
            }
        }
    }
    if let Some(file) = &c.hs256_secret_file {
        let bytes = read(base, file)?;
        // One line ending (as editors and `echo` leave it), LF or CRLF, is not the secret's.
        let trimmed = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed).to_vec();
        if trimmed.is_empty() {
            return Err((
                file.span(),
                format!("hs256_secret_file {:?} is empty", file.get_ref()),
            ));
        }
        let what = format!("the secret in {:?} (hs256_secret_file)", file.get_ref());
        long_enough(&trimmed, &what).map_err(|m| (file.span(), m))?;
        keys.push(KeyMaterial::Hs256Secret(trimmed));
    }
    for pem in &c.public_keys {
        let bytes = read(base, pem)?;
        if bytes.windows(11).any(|w| w == b"PRIVATE KEY") {
            return Err((
                pem.span(),
                format!(
                    "{:?} is a private key; `public_keys` takes public keys (`openssl pkey -in KEY -pubout`), and the private half should not be on the gateway at all",
                    pem.get_ref()
                ),
            ));
        }
        if pem_key(&bytes).is_none() {
            return Err((
                pem.span(),
                format!(
                    "{:?} is not an RSA, EC or Ed25519 public key in PEM",
                    pem.get_ref()
                ),
            ));
        }
        keys.push(KeyMaterial::Pem(bytes));
    }
    if let Some(f) = &c.jwks_file {
        keys.push(load_jwks(f, base)?);
    }
    Ok(keys)
}

/// The shortest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as long
/// as the hash output. A shorter one (and every token it signs is visible to clients)
/// can be searched for offline, and then anyone can sign tokens for the tenant.
pub const MIN_HS256_SECRET: usize = 32;

fn long_enough(secret: &[u8], what: &str) -> Result<(), String> {
    if secret.len() < MIN_HS256_SECRET {
        return Err(format!(
            "{what} is {} bytes; an HS256 secret needs at least {MIN_HS256_SECRET} (RFC 7518 §3.2), or tokens can be forged by guessing it",
            secret.len()
        ));
    }
    Ok(())
}

/// Reads and checks a JWKS file.
pub fn load_jwks(
    file: &Spanned<String>,
    base: &Path,
) -> Result<KeyMaterial, (std::ops::Range<usize>, String)> {
    let bytes = read(base, file)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| (file.span(), format!("{:?} is not UTF-8", file.get_ref())))?;
    let keys = jwks_keys(&text).map_err(|e| {
        (
            file.span(),
            format!("{:?} is not a JWKS document: {e}", file.get_ref()),
        )
    })?;
    for (i, jwk) in keys.iter().enumerate() {
        if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(p) = &jwk.algorithm {
            let kid = jwk.common.key_id.as_deref().unwrap_or("-");
            let what = format!(
                "{:?}: the HMAC key at index {i} (kid {kid:?})",
                file.get_ref()
            );
            let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.value.trim_end_matches('='))
                .map_err(|_| (file.span(), format!("{what} is not base64url")))?;
            long_enough(&secret, &what).map_err(|m| (file.span(), m))?;
        }
    }
    if keys.iter().filter_map(jwk_key).next().is_none() {
        return Err((
            file.span(),
            format!(
                "{:?} holds no usable key (each needs an `alg` this gateway verifies — HS256/384/512, RS*, PS*, ES256 on P-256, ES384 on P-384, EdDSA on Ed25519 — that fits its key, and RSA keys 2048 to 8192 bits)",
                file.get_ref()
            ),
        ));
    }
    Ok(KeyMaterial::Jwks(text))
}

fn read(base: &Path, file: &Spanned<String>) -> Result<Vec<u8>, (std::ops::Range<usize>, String)> {
    let path = base.join(file.get_ref());
    crate::file::read(&path)
        .map_err(|e| (file.span(), format!("cannot read {}: {e}", path.display())))
}

fn pem_key(pem: &[u8]) -> Option<(DecodingKey, &'static [Algorithm])> {
    const RSA: &[Algorithm] = &[
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ];
    const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
    const ED: &[Algorithm] = &[Algorithm::EdDSA];
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Some((k, RSA));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Some((k, EC));
    }
    DecodingKey::from_ed_pem(pem).ok().map(|k| (k, ED))
}

/// The keys of a JWKS document that this gateway can read. An identity provider's
/// set often holds keys for algorithms a given verifier does not support (ES512,
/// encryption keys): those are skipped, not a reason to refuse the whole set.
fn jwks_keys(text: &str) -> Result<Vec<jsonwebtoken::jwk::Jwk>, String> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("it has no \"keys\" array")?;
    Ok(keys
        .iter()
        .filter_map(|k| serde_json::from_value(k.clone()).ok())
        .collect())
}

/// A key of a JWKS and the one algorithm it verifies, when its `alg` fits its type
/// (an RSA key marked HS256 would never verify anything).
fn jwk_key(jwk: &jsonwebtoken::jwk::Jwk) -> Option<(DecodingKey, Vec<Algorithm>)> {
    use jsonwebtoken::jwk::{AlgorithmParameters as P, EllipticCurve};
    use Algorithm::*;
    let alg = jwk.common.key_algorithm?;
    let alg: Algorithm = alg.to_string().parse().ok()?;
    let fits = match &jwk.algorithm {
        P::OctetKey(_) => matches!(alg, HS256 | HS384 | HS512),
        P::RSA(rsa) => {
            // What the verifier accepts: 2048 to 8192 bits.
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .ok()?;
            let bytes = n.iter().skip_while(|b| **b == 0).count();
            matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                && (256..=1024).contains(&bytes)
        }
        P::EllipticCurve(ec) => matches!(
            (alg, &ec.curve),
            (ES256, EllipticCurve::P256) | (ES384, EllipticCurve::P384)
        ),
        P::OctetKeyPair(okp) => alg == EdDSA && okp.curve == EllipticCurve::Ed25519,
    };
    if !fits {
        return None;
    }
    Some((DecodingKey::from_jwk(jwk).ok()?, vec![alg]))
}

/// The claims of a verified token.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// Keys ready for verification, each with the algorithms it may verify.
pub struct KeySet {
    keys: Vec<(DecodingKey, Vec<Algorithm>)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl KeySet {
    pub fn build(r: &ResolvedJwt, leeway: u64) -> KeySet {
        let mut keys = Vec::new();
        for k in &r.keys {
            match k {
                KeyMaterial::Hs256Secret(s) => {
                    keys.push((DecodingKey::from_secret(s), vec![Algorithm::HS256]))
                }
                KeyMaterial::Pem(p) => {
                    if let Some((k, algs)) = pem_key(p) {
                        keys.push((k, algs.to_vec()));
                    }
                }
                KeyMaterial::Jwks(text) => {
                    if let Ok(set) = jwks_keys(text) {
                        keys.extend(set.iter().filter_map(jwk_key));
                    }
                }
            }
        }
        KeySet {
            keys,
            issuer: r.issuer.clone(),
            audience: r.audience.clone(),
            leeway,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The verified claims, or `None` when no key of this set verifies the token.
    pub fn verify(
        &self,
        token: &str,
        alg: Algorithm,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        for (key, algs) in &self.keys {
            if !algs.contains(&alg) {
                continue;
            }
            let mut v = Validation::new(alg);
            v.leeway = self.leeway;
            v.validate_nbf = true;
            // A configured issuer or audience is required, not only checked when the
            // token happens to carry it (a claim of the wrong type counts as absent).
            match (&self.issuer, &self.audience) {
                (None, None) => v.set_required_spec_claims(&["exp"]),
                (Some(_), None) => v.set_required_spec_claims(&["exp", "iss"]),
                (None, Some(_)) => v.set_required_spec_claims(&["exp", "aud"]),
                (Some(_), Some(_)) => v.set_required_spec_claims(&["exp", "iss", "aud"]),
            }
            match &self.issuer {
                Some(i) => v.set_issuer(&[i]),
                None => v.iss = None,
            }
            match &self.audience {
                Some(a) => v.set_audience(&[a]),
                None => v.validate_aud = false,
            }
            if let Ok(data) = jsonwebtoken::decode::<Claims>(token, key, &v) {
                // The library checks `nbf` only when it is a number; one that is not
                // cannot be honoured, so the token is not valid.
                if data.claims.get("nbf").is_some_and(|n| !n.is_number()) {
                    return None;
                }
                return Some(data.claims);
            }
        }
        None
    }
}

/// The token the request presents: `Bearer <token>` in `Authorization` (or the raw
/// value of another configured header), else the configured cookie. `None` when it
/// presents none.
pub fn presented<'h>(
    headers: &'h HeaderMap,
    header: &HeaderName,
    cookie: Option<&str>,
) -> Result<Option<&'h str>, ProxyError> {
    let mut values = headers.get_all(header).iter();
    let Some(v) = values.next() else {
        return Ok(cookie.and_then(|name| cookie_value(headers, name)));
    };
    if values.next().is_some() {
        return Err(ProxyError::InvalidToken);
    }
    let s = v.to_str().map_err(|_| ProxyError::InvalidToken)?;
    if header == http::header::AUTHORIZATION {
        let Some((scheme, token)) = s.split_once(' ') else {
            return Ok(None);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            // Basic and other schemes are not our credential.
            return Ok(None);
        }
        return Ok(Some(token.trim()));
    }
    Ok(Some(s.trim()))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The token's algorithm and the tenant id it claims, read before verification only
/// to choose the keys.
pub fn peek(token: &str, tenant_claim: &str) -> Result<(Algorithm, Option<String>), ProxyError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| ProxyError::InvalidToken)?;
    let payload = token.split('.').nth(1).ok_or(ProxyError::InvalidToken)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| ProxyError::InvalidToken)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| ProxyError::InvalidToken)?;
    let tenant = claims
        .get(tenant_claim)
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Ok((header.alg, tenant))
}
