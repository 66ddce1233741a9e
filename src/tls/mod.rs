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
//!
//! `files` reads and checks the certificate files of a config; `client` makes the TLS
//! client configs of `https://` upstreams.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::snapshot::Snapshot;

mod client;
mod files;

pub use client::upstream_client_config;
pub use files::*;

/// The crypto provider of every TLS config, client and server.
pub fn provider() -> Arc<CryptoProvider> {
    static P: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The serving side of one tenant's TLS (or of the default certificate).
pub struct ServerSide {
    pub config: Arc<ServerConfig>,
    /// Client certificates are required and verified.
    pub mtls: bool,
    /// The fingerprint of the client CA bundle that verifies them (0 without mTLS).
    pub client_ca: u64,
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
    /// That CA bundle's fingerprint (`ServerSide::client_ca`): a connection verified
    /// by a CA the tenant no longer trusts serves it no more.
    pub mtls_ca: u64,
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
        // A TLS connection starts with a handshake record (0x16); a letter is a plain
        // HTTP request line sent to the TLS port. It gets a 400 saying so, as nginx
        // answers it, not a silent close (one peek per connection, before the
        // handshake's own reads).
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 1 && first[0].is_ascii_alphabetic() {
            plain_http_answer(stream, &snapshot.load_full()).await;
            return Err(io::Error::other("a plain HTTP request on the TLS listener"));
        }
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let sni = start.client_hello().server_name().map(normalize_sni);
        let snap = snapshot.load();
        let (side, tenant) = match sni.as_deref().and_then(|h| snap.tenant_by_host(h)) {
            Some(idx) => {
                let t = snap.tenant(idx);
                match &t.tls {
                    Some(side) => (&**side, Some(t.id.clone())),
                    None => (snap.default_tls()?, None),
                }
            }
            None => (snap.default_tls()?, None),
        };
        let config = side.config.clone();
        let (mtls, ca) = (side.mtls, side.client_ca);
        drop(snap);
        let tls = start.into_stream(config).await?;
        let mut conn = ConnTls {
            sni,
            ..ConnTls::default()
        };
        if mtls {
            conn.mtls_tenant = tenant;
            conn.mtls_ca = ca;
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

/// The answer to a plain HTTP request on the TLS listener: the gateway's 400, then the
/// close (the request itself is not read); counted and logged under no tenant.
async fn plain_http_answer(mut stream: TcpStream, snap: &Snapshot) {
    use tokio::io::AsyncWriteExt;
    let e = crate::error::ProxyError::MalformedRequest {
        why: "a plain HTTP request was sent to the HTTPS port",
    };
    let answer = crate::proxy::refusal_bytes(&e, snap);
    let _ = stream.write_all(&answer).await;
    let _ = stream.shutdown().await;
    // Read what the client sent (briefly, a little) before the socket closes: closing
    // with it unread would send a reset, which can destroy the answer in flight.
    let drain = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

fn normalize_sni(name: &str) -> Box<str> {
    name.trim_end_matches('.').to_ascii_lowercase().into()
}

/// The subject distinguished name of a DER certificate, as a header value; `None`
/// for an empty subject.
fn subject(der: &CertificateDer<'_>) -> Option<HeaderValue> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let dn = rfc4514(cert.subject());
    (!dn.is_empty()).then(|| HeaderValue::from_str(&dn).ok())?
}

/// A distinguished name as RFC 4514 writes it (nginx's `$ssl_client_s_dn`): the last
/// RDN first, `,` between RDNs and `+` inside one, short attribute names where there
/// are any (`CN`, `O`, …; else the dotted OID), and every character that could be
/// read as structure escaped — so a CN of `bob, O=Admin Corp` cannot pass for an
/// organisation of its own. Bytes outside visible ASCII go as `\XX` hex pairs (a
/// header value has room for nothing else); a value of no string type goes as `#`
/// and the hex of its DER encoding.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    use std::fmt::Write as _;
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<_> = name.iter().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(attr.attr_type(), registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            let value = attr.attr_value();
            let text = match value.tag() {
                x509_parser::der_parser::asn1_rs::Tag::BmpString => {
                    let units = value
                        .data
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]));
                    char::decode_utf16(units)
                        .collect::<Result<String, _>>()
                        .ok()
                }
                _ => attr.as_str().ok().map(str::to_owned),
            };
            let Some(text) = text else {
                // `#` and the DER encoding: tag, length, content.
                out.push('#');
                let data = value.data;
                let mut der = vec![(value.tag().0 & 0x1f) as u8];
                match data.len() {
                    n if n < 0x80 => der.push(n as u8),
                    n if n <= 0xff => der.extend([0x81, n as u8]),
                    n => der.extend([0x82, (n >> 8) as u8, n as u8]),
                }
                der.extend_from_slice(&data[..data.len().min(0xffff)]);
                for b in der {
                    let _ = write!(out, "{b:02X}");
                }
                continue;
            };
            let last = text.len().saturating_sub(1);
            for (k, b) in text.bytes().enumerate() {
                match b {
                    b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' => {
                        out.push('\\');
                        out.push(b as char);
                    }
                    b' ' | b'#' if k == 0 => {
                        out.push('\\');
                        out.push(b as char);
                    }
                    // Not `\ `: a header value's last space is trimmed on the way.
                    b' ' if k == last => out.push_str("\\20"),
                    0x21..=0x7e | b' ' => out.push(b as char),
                    _ => {
                        let _ = write!(out, "\\{b:02X}");
                    }
                }
            }
        }
    }
    out
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
