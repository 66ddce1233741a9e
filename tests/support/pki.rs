//! Test certificates (made with rcgen in the test) and a real TLS client (rustls), to
//! drive the gateway's TLS listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{read, Reply};

/// A certificate authority that issues server and client certificates into `dir`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    /// `ca.pem` in the directory.
    pub path: PathBuf,
    dir: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
            path,
            dir: dir.to_owned(),
        }
    }

    /// A server certificate for `names` with this serial, written to `{file}.pem` and
    /// `{file}.key`; returns the two paths.
    pub fn server(&self, file: &str, names: &[&str], serial: u64) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(file));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.write(file, &params)
    }

    /// A client certificate with this common name.
    pub fn client(&self, file: &str, cn: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme Corp");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.write(file, &params)
    }

    /// A client certificate that says outright it is no CA (basicConstraints
    /// CA:FALSE), as `openssl req -x509` and most CAs issue them.
    #[allow(dead_code)] // Not every test binary uses it.
    pub fn client_no_ca(&self, file: &str, cn: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.write(file, &params)
    }

    fn write(&self, file: &str, params: &CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        write_atomic(&c, cert.pem().as_bytes());
        write_atomic(&k, key.serialize_pem().as_bytes());
        (c, k)
    }
}

/// A TLS server config for a test upstream: `cert` (chain and key files, as
/// [`Ca::server`] writes them), offering `alpn`.
pub fn server_config(cert: &(PathBuf, PathBuf), alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let chain = CertificateDer::pem_file_iter(&cert.0)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.1).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// Writes through a temporary file and a rename, as a deploy tool would.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// What a TLS client saw of the server.
pub struct Seen {
    pub serial: String,
    pub subject: String,
    pub alpn: Option<Vec<u8>>,
    /// The handshake resumed an earlier session.
    pub resumed: bool,
}

/// A TLS client trusting `ca`, optionally presenting a client certificate.
pub fn client_config(
    ca: &str,
    client_cert: Option<&(PathBuf, PathBuf)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((c, k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(k).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connects to `addr` with `sni`; the handshake's result.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(TlsStream<TcpStream>, Seen)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let der = conn.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let seen = Seen {
        serial: cert.raw_serial_as_string(),
        subject: cert.subject().to_string(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    };
    Ok((tls, seen))
}

/// An HTTP/1.1 connection over an established TLS stream.
pub struct H1 {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn over(tls: TlsStream<TcpStream>) -> H1 {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        H1 { send }
    }

    /// A GET; `Err` when the connection failed (say, the server refused the handshake
    /// after the fact, as TLS 1.3 does with client certificates).
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let mut req = Request::builder().uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send.ready().await.map_err(|e| e.to_string())?;
        let resp = self
            .send
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        Ok(read(resp).await)
    }
}

/// One GET over a new TLS connection: the reply and what the client saw.
pub async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    host: &str,
) -> Result<(Reply, Seen), String> {
    let (tls, seen) = connect(addr, sni, config)
        .await
        .map_err(|e| e.to_string())?;
    let mut h1 = H1::over(tls).await;
    let reply = h1.get(path, &[("host", host)]).await?;
    Ok((reply, seen))
}

/// Writes `bytes` on a new TLS connection (ALPN http/1.1) and reads until the server
/// closes it: every byte of every answer.
pub async fn tls_raw(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tls, _) = connect(addr, sni, config).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut chunk))
            .await
            .expect("answered and closed in time");
        match read {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The answers in `raw` (HTTP/1.1 responses with a `content-length`), in order:
/// status, head, body.
pub fn responses(raw: &[u8]) -> Vec<(u16, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end + 4]).into_owned();
        let status = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let body = rest[end + 4..(end + 4 + len).min(rest.len())].to_vec();
        rest = &rest[(end + 4 + len).min(rest.len())..];
        out.push((status, head, body));
    }
    out
}
