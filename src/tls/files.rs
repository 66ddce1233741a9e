//! Certificate, key and CA files: the `[server.tls]` / `[tenants.X.tls]` config, loading
//! and checking them (with positions for `bulkhead check`).

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::HeaderName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use serde::Deserialize;
use toml::Spanned;

use crate::config::HostPattern;

use super::provider;

/// `[server.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub default_cert: Spanned<String>,
    pub default_key: Spanned<String>,
    pub min_version: Option<Spanned<String>>,
}

/// `[tenants.X.tls]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantTlsConfig {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    /// Client certificates must chain to these CAs (mTLS) for the tenant's hosts.
    pub client_ca: Option<Spanned<String>>,
    /// The verified client certificate's subject is forwarded in this header.
    pub forward_client_cert: Option<Spanned<String>>,
}

/// A certificate chain with its private key, checked to match.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub key: Arc<CertifiedKey>,
    /// A hash of both files' bytes: a reload re-reads them, and a changed file is a
    /// changed config.
    pub fingerprint: u64,
}

/// The CAs that sign a tenant's client certificates.
#[derive(Clone, Debug)]
pub struct ClientCa {
    pub roots: Arc<RootCertStore>,
    pub fingerprint: u64,
}

/// `[server.tls]` with its files loaded.
#[derive(Clone, Debug)]
pub struct ResolvedServerTls {
    pub default: CertPair,
    /// `min_version = "1.3"`: TLS 1.2 is refused too.
    pub tls13_only: bool,
}

/// `[tenants.X.tls]` with its files loaded.
#[derive(Clone, Debug)]
pub struct ResolvedTenantTls {
    pub cert: Option<CertPair>,
    pub client_ca: Option<ClientCa>,
    /// Lower case.
    pub forward_client_cert: Option<String>,
}

impl PartialEq for ResolvedTenantTls {
    fn eq(&self, other: &Self) -> bool {
        self.cert.as_ref().map(|c| c.fingerprint) == other.cert.as_ref().map(|c| c.fingerprint)
            && self.client_ca.as_ref().map(|c| c.fingerprint)
                == other.client_ca.as_ref().map(|c| c.fingerprint)
            && self.forward_client_cert == other.forward_client_cert
    }
}

/// A problem with a position in the config file.
pub type Problem = (Range<usize>, String);

fn read(raw: &Spanned<String>, base: &Path, what: &str) -> Result<(PathBuf, Vec<u8>), Problem> {
    let path = base.join(raw.get_ref());
    match crate::file::read(&path) {
        Ok(b) => Ok((path, b)),
        Err(e) => Err((
            raw.span(),
            format!("cannot read the {what} {}: {e}", path.display()),
        )),
    }
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Reads a PEM certificate chain and its PEM private key and checks that they match.
pub fn load_pair(
    cert: &Spanned<String>,
    key: &Spanned<String>,
    base: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<CertPair, Problem> {
    let (cert_path, cert_pem) = read(cert, base, "certificate")?;
    files.push(cert_path.clone());
    let (key_path, key_pem) = read(key, base, "private key")?;
    files.push(key_path.clone());
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                cert.span(),
                format!(
                    "{} is not a PEM certificate chain: {e}",
                    cert_path.display()
                ),
            )
        })?;
    if chain.is_empty() {
        return Err((
            cert.span(),
            format!("{} holds no PEM certificate", cert_path.display()),
        ));
    }
    // A PEM block whose contents are not a certificate: said of the certificate, not
    // reported later as a key that does not fit it.
    for (i, der) in chain.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(der.as_ref()) {
            return Err((
                cert.span(),
                format!(
                    "{}: certificate {} of the chain is not a valid X.509 certificate: {e}",
                    cert_path.display(),
                    i + 1
                ),
            ));
        }
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            key.span(),
            format!("{} is not a PEM private key: {e}", key_path.display()),
        )
    })?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        (
            key.span(),
            format!(
                "the key {} does not fit the certificate {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    let mut fingerprint = 0xcbf2_9ce4_8422_2325;
    fnv(&mut fingerprint, &cert_pem);
    fnv(&mut fingerprint, &key_pem);
    Ok(CertPair {
        key: Arc::new(certified),
        fingerprint,
    })
}

/// Reads a PEM bundle of CA certificates; `of`: what they verify, `"client"` or
/// `"upstream"`, for the messages.
pub fn load_ca(
    raw: &Spanned<String>,
    base: &Path,
    files: &mut Vec<PathBuf>,
    of: &str,
) -> Result<ClientCa, Problem> {
    let (path, pem) = read(raw, base, &format!("{of} CA bundle"))?;
    files.push(path.clone());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            (
                raw.span(),
                format!("{} is not a PEM certificate bundle: {e}", path.display()),
            )
        })?;
        // A leaf certificate here verifies no client: every handshake would fail.
        if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            let not_ca = match parsed.basic_constraints() {
                Ok(Some(bc)) if !bc.value.ca => Some("its basicConstraints say CA:FALSE"),
                _ => match parsed.key_usage() {
                    Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                        Some("its keyUsage does not allow signing certificates")
                    }
                    _ => None,
                },
            };
            if let Some(why) = not_ca {
                return Err((
                    raw.span(),
                    format!(
                        "{} holds a certificate that is not a CA ({}): {why}, so it can verify no {of} certificate",
                        path.display(),
                        parsed.subject()
                    ),
                ));
            }
        }
        roots.add(cert).map_err(|e| {
            (
                raw.span(),
                format!("{} holds a certificate that is no CA: {e}", path.display()),
            )
        })?;
    }
    if roots.is_empty() {
        return Err((
            raw.span(),
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    let mut fingerprint = 0xcbf2_9ce4_8422_2325;
    fnv(&mut fingerprint, &pem);
    Ok(ClientCa {
        roots: Arc::new(roots),
        fingerprint,
    })
}

/// Whether the end-entity certificate is valid for `host` (for `*.acme.com`, for any
/// one label below `acme.com`).
pub fn covers(pair: &CertPair, host: &HostPattern) -> bool {
    let Some(der) = pair.key.cert.first() else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let name = match host {
        HostPattern::Exact(h) => h.clone(),
        HostPattern::Wildcard(h) => format!("bulkhead-wildcard-check.{h}"),
    };
    match ServerName::try_from(name) {
        Ok(n) => cert.verify_is_valid_for_subject_name(&n).is_ok(),
        Err(_) => false,
    }
}

/// Checks `server.tls_listen`, `server.redirect_http` and `[server.tls]` and loads the
/// default certificate. Problems go to `err`.
pub fn validate_server(
    server: &crate::config::ServerConfig,
    tls_listen: Option<SocketAddr>,
    base: &Path,
    files: &mut Vec<PathBuf>,
    err: &mut impl FnMut(Range<usize>, String),
) -> Option<ResolvedServerTls> {
    if *server.redirect_http.get_ref() && tls_listen.is_none() {
        err(
            server.redirect_http.span(),
            "`server.redirect_http = true` needs `server.tls_listen`: there is no https listener to redirect to".to_owned(),
        );
    }
    let Some(tls) = &server.tls else {
        if let Some(l) = &server.tls_listen {
            err(
                l.span(),
                "`server.tls_listen` needs `[server.tls]` with `default_cert` and `default_key`"
                    .to_owned(),
            );
        }
        return None;
    };
    if tls_listen.is_none() && server.tls_listen.is_none() {
        // As for `[tenants.ID.tls]`: certificates nothing would serve.
        err(
            tls.default_cert.span(),
            "`[server.tls]` needs `server.tls_listen`: without an https listener its certificates serve nothing".to_owned(),
        );
    }
    let tls13_only = match tls.min_version.as_ref().map(|v| v.get_ref().as_str()) {
        None | Some("1.2") => false,
        Some("1.3") => true,
        Some(other) => {
            let span = tls.min_version.as_ref().map_or(0..0, |v| v.span());
            err(
                span,
                format!("`server.tls.min_version` must be \"1.2\" or \"1.3\", not {other:?}"),
            );
            false
        }
    };
    match load_pair(&tls.default_cert, &tls.default_key, base, files) {
        Ok(default) => Some(ResolvedServerTls {
            default,
            tls13_only,
        }),
        Err((span, msg)) => {
            err(span, format!("server.tls: {msg}"));
            None
        }
    }
}

/// Checks and loads `[tenants.X.tls]`: a certificate and key come as a pair and must
/// cover every one of the tenant's hosts.
pub fn validate_tenant(
    id: &str,
    t: &TenantTlsConfig,
    hosts: &[HostPattern],
    tls_on: bool,
    base: &Path,
    files: &mut Vec<PathBuf>,
    err: &mut impl FnMut(Range<usize>, String),
) -> Option<ResolvedTenantTls> {
    let any = [&t.cert, &t.key, &t.client_ca, &t.forward_client_cert]
        .into_iter()
        .flatten()
        .next()?;
    if !tls_on {
        err(
            any.span(),
            format!("`[tenants.{id}.tls]` needs `server.tls_listen` and `[server.tls]`"),
        );
        return None;
    }
    let cert = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => match load_pair(c, k, base, files) {
            Ok(pair) => {
                for h in hosts {
                    if !covers(&pair, h) {
                        err(
                            c.span(),
                            format!(
                                "the certificate of tenant {id:?} does not cover its host {:?}",
                                h.to_string()
                            ),
                        );
                    }
                }
                Some(pair)
            }
            Err((span, msg)) => {
                err(span, format!("tenant {id:?}: {msg}"));
                None
            }
        },
        (Some(c), None) => {
            err(
                c.span(),
                format!("tenant {id:?}: `tls.cert` needs `tls.key`"),
            );
            None
        }
        (None, Some(k)) => {
            err(
                k.span(),
                format!("tenant {id:?}: `tls.key` needs `tls.cert`"),
            );
            None
        }
        (None, None) => None,
    };
    let client_ca = t
        .client_ca
        .as_ref()
        .and_then(|ca| match load_ca(ca, base, files, "client") {
            Ok(ca) => Some(ca),
            Err((span, msg)) => {
                err(span, format!("tenant {id:?}: {msg}"));
                None
            }
        });
    let forward_client_cert = t.forward_client_cert.as_ref().and_then(|h| {
        if t.client_ca.is_none() {
            err(
                h.span(),
                format!("tenant {id:?}: `tls.forward_client_cert` needs `tls.client_ca`: without client certificates there is nothing to forward"),
            );
        }
        match HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(name) => match crate::headers::reserved(name.as_str(), true) {
                Some(why) => {
                    err(
                        h.span(),
                        format!("`tls.forward_client_cert` cannot be {:?}: {why}", h.get_ref()),
                    );
                    None
                }
                None => Some(name.as_str().to_owned()),
            },
            Err(_) => {
                err(
                    h.span(),
                    format!("`tls.forward_client_cert` {:?} is not a valid header name", h.get_ref()),
                );
                None
            }
        }
    });
    Some(ResolvedTenantTls {
        cert,
        client_ca,
        forward_client_cert,
    })
}
