//! TLS at the edge: `server.tls_listen`, certificates per tenant chosen by SNI, the
//! minimum protocol version, and client certificates (mTLS) per tenant.
//!
//! Certificate and key files are read and checked while the config is validated (a
//! missing file, a key that does not match its certificate, or a certificate that
//! does not cover the tenant's hosts fails `check` and a reload with the file's
//! position). The snapshot holds one rustls `ServerConfig` per tenant that has its own
//! certificate or client CA, plus the default one; the handshake reads the client's
//! SNI first ([`LazyConfigAcceptor`]) and picks the config from the snapshot in force,
//! so a reload swaps certificates for new handshakes and leaves open connections alone.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use toml::Spanned;

use crate::config::HostPattern;
use crate::snapshot::Snapshot;

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

/// The crypto provider of every TLS config, client and server.
pub fn provider() -> Arc<CryptoProvider> {
    static P: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
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
    match std::fs::read(&path) {
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

/// Reads a PEM bundle of CA certificates.
pub fn load_ca(
    raw: &Spanned<String>,
    base: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<ClientCa, Problem> {
    let (path, pem) = read(raw, base, "client CA bundle")?;
    files.push(path.clone());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            (
                raw.span(),
                format!("{} is not a PEM certificate bundle: {e}", path.display()),
            )
        })?;
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

/// The serving side of one tenant's TLS (or of the default certificate).
pub struct ServerSide {
    pub config: Arc<ServerConfig>,
    /// Client certificates are required and verified.
    pub mtls: bool,
    pub forward_client_cert: Option<HeaderName>,
}

impl std::fmt::Debug for ServerSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSide")
            .field("mtls", &self.mtls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A rustls server config serving `cert`, offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(
    cert: &CertPair,
    tls13_only: bool,
    client_ca: Option<&ClientCa>,
    keys: &mut TicketKeys<'_>,
) -> Result<Arc<ServerConfig>, String> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider())
                    .build()
                    .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(OneCert(cert.key.clone())));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless resumption: sessions do not depend on a per-config cache of 256
    // entries (which more than ~128 clients thrash) and survive reloads (every snapshot
    // builds new configs). The ticket key belongs to the TLS settings it was issued
    // under: a new certificate, client CA or minimum version gets a new key, so no
    // session made before the change resumes after it. rustls also checks the SNI of a
    // resumed session against the one it was issued for.
    let mut settings = cert.fingerprint ^ u64::from(tls13_only);
    if let Some(ca) = client_ca {
        settings = settings.rotate_left(1) ^ ca.fingerprint;
    }
    if let Some(t) = keys.get(settings) {
        config.ticketer = t;
        config.send_tls13_tickets = 1;
    }
    Ok(Arc::new(config))
}

/// Ticket keys by the TLS settings they serve (see [`server_config`]), kept in the
/// snapshot and carried over to the next one for the settings it still has.
pub type TicketMap = std::collections::HashMap<u64, Arc<dyn rustls::server::ProducesTickets>>;

/// The ticket keys of the snapshot being built, and of the one before it.
pub struct TicketKeys<'a> {
    pub previous: Option<&'a TicketMap>,
    pub current: TicketMap,
}

impl TicketKeys<'_> {
    /// The key for `settings`, made on first use (rustls rotates it every 6 hours);
    /// `None` if the system could not produce random bytes, and then the per-config
    /// session cache is used.
    fn get(&mut self, settings: u64) -> Option<Arc<dyn rustls::server::ProducesTickets>> {
        if let Some(t) = self.current.get(&settings) {
            return Some(t.clone());
        }
        let t = match self.previous.and_then(|p| p.get(&settings)) {
            Some(t) => t.clone(),
            None => match rustls::crypto::ring::Ticketer::new() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "no TLS ticket key; session resumption uses a per-config cache");
                    return None;
                }
            },
        };
        self.current.insert(settings, t.clone());
        Some(t)
    }
}

/// What a TLS connection established, for its requests.
#[derive(Debug, Default)]
pub struct ConnTls {
    /// The SNI name, lower case without a trailing dot.
    pub sni: Option<Box<str>>,
    /// The tenant whose client CA verified the client's certificate.
    pub mtls_tenant: Option<Arc<str>>,
    /// The verified client certificate's subject (`CN=…,O=…`).
    pub client_subject: Option<HeaderValue>,
}

/// Reads the ClientHello, picks the certificate (and client verification) of the
/// tenant its SNI names from the snapshot in force, and completes the handshake, all
/// within `timeout`. `None` when the client went away or failed the handshake.
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    snapshot: &arc_swap::ArcSwap<Snapshot>,
    timeout: Duration,
) -> Option<(TlsStream<TcpStream>, ConnTls)> {
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let sni = start.client_hello().server_name().map(normalize_sni);
        let snap = snapshot.load();
        let (side, tenant) = match sni.as_deref().and_then(|h| snap.tenant_by_host(h)) {
            Some(idx) => {
                let t = snap.tenant(idx);
                match &t.tls {
                    Some(side) => (side, Some(t.id.clone())),
                    None => (snap.default_tls()?, None),
                }
            }
            None => (snap.default_tls()?, None),
        };
        let config = side.config.clone();
        let mtls = side.mtls;
        drop(snap);
        let tls = start.into_stream(config).await?;
        let mut conn = ConnTls {
            sni,
            ..ConnTls::default()
        };
        if mtls {
            conn.mtls_tenant = tenant;
            conn.client_subject = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| subject(der));
        }
        Ok::<_, io::Error>((tls, conn))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not completed in time");
            None
        }
    }
}

fn normalize_sni(name: &str) -> Box<str> {
    name.trim_end_matches('.').to_ascii_lowercase().into()
}

/// The subject distinguished name of a DER certificate, as a header value.
fn subject(der: &CertificateDer<'_>) -> Option<HeaderValue> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    HeaderValue::from_str(&cert.subject().to_string()).ok()
}

impl Snapshot {
    /// The default certificate's config; `None` (the handshake is refused) when TLS is
    /// not configured, which validation does not allow with `tls_listen`.
    fn default_tls(&self) -> io::Result<&ServerSide> {
        self.tls
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "TLS is not configured"))
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
    if server.redirect_http && tls_listen.is_none() {
        err(
            0..0,
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
        .and_then(|ca| match load_ca(ca, base, files) {
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
            Ok(name) => Some(name.as_str().to_owned()),
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

/// The system's trusted roots (read once).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "a system root certificate could not be loaded");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "loaded the system root certificates");
            Arc::new(roots)
        })
        .clone()
}

/// The TLS client config for an upstream's `https://` targets: verified against `ca`
/// (or the system roots), ALPN `h2` or `http/1.1`.
pub fn upstream_client_config(
    ca: Option<&ClientCa>,
    insecure: bool,
    h2: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth()
    } else {
        let roots = ca.map_or_else(system_roots, |c| c.roots.clone());
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(Arc::new(config))
}

/// `tls_insecure_skip_verify`: any certificate is accepted (the handshake signatures
/// are still checked, so the session is encrypted, just not authenticated).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
