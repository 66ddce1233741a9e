//! `[server]`: the listeners and the ports they may not share, the server's TLS,
//! the timeouts, trusted proxies and worker count, and the paths it writes to
//! (`state_dir`, `audit_log`).

use super::*;

/// The most `server.max_header_bytes` may be.
const MAX_HEADER_BYTES: u64 = 8 * 1024 * 1024;

/// `[server]`, validated as far as the rest of the file needs it.
pub(super) struct Server {
    pub(super) listen: Option<SocketAddr>,
    pub(super) admin_listen: Option<SocketAddr>,
    pub(super) tls_listen: Option<SocketAddr>,
    pub(super) tls: Option<crate::tls::ResolvedServerTls>,
    pub(super) trusted_proxies: Vec<ipnet::IpNet>,
}

impl Validator<'_> {
    /// `[server]` but its paths; also each `request_timeout` (checked here, in the
    /// order the rules have always been run). `tls_files` gets the server's
    /// certificate and key files.
    pub(super) fn server(
        &mut self,
        path: &Path,
        f: &FileConfig,
        tls_files: &mut Vec<PathBuf>,
    ) -> Server {
        let server = &f.server;
        let listen = self.addr(&server.listen, "server.listen");
        let admin_listen = self.addr(&server.admin_listen, "server.admin_listen");
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if overlaps(l, a) {
                // At whichever of the two the file sets (a default has no position).
                let (span, msg) = if server.admin_listen.span().is_empty() {
                    (
                        server.listen.span(),
                        format!("`server.listen` ({l}) takes the port of `server.admin_listen` (default {a}): set `server.admin_listen` to another address; the admin API is never served on the data plane"),
                    )
                } else {
                    (
                        server.admin_listen.span(),
                        format!("`server.admin_listen` ({a}) must not share its port with `server.listen` ({l}): the admin API is never served on the data plane"),
                    )
                };
                self.error(span, msg);
            }
        }
        let tls_listen = server
            .tls_listen
            .as_ref()
            .and_then(|l| self.addr(l, "server.tls_listen"));
        if let (Some(t), Some(spanned)) = (tls_listen, &server.tls_listen) {
            if [listen, admin_listen]
                .into_iter()
                .flatten()
                .any(|o| overlaps(t, o))
            {
                self.error(
                    spanned.span(),
                    format!("`server.tls_listen` ({t}) must not share its port with `server.listen` or `server.admin_listen`"),
                );
            }
        }
        let tls = {
            let base = path.parent().unwrap_or(Path::new("."));
            let mut problems = Vec::new();
            let tls = crate::tls::validate_server(
                server,
                tls_listen,
                base,
                tls_files,
                &mut |span, msg| problems.push((span, msg)),
            );
            for (span, msg) in problems {
                self.error(span, msg);
            }
            tls
        };
        let header_bytes = server.max_header_bytes.get_ref().0;
        if header_bytes < 1024 {
            self.error(
                server.max_header_bytes.span(),
                "`server.max_header_bytes` must be at least 1KiB".to_owned(),
            );
        } else if header_bytes > MAX_HEADER_BYTES {
            // Each connection may buffer this much of a head, and an HTTP/2 one twice it:
            // beyond a few MiB it is a way to exhaust memory, not a limit (Envoy caps
            // its own at 8 MiB).
            self.error(
                server.max_header_bytes.span(),
                format!("`server.max_header_bytes` must be at most 8MiB, not {header_bytes} bytes: every connection may hold a head this large"),
            );
        }

        let mut trusted_proxies = Vec::new();
        for p in &server.trusted_proxies {
            let raw = p.get_ref().trim();
            let net = raw
                .parse::<ipnet::IpNet>()
                .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match net {
                Ok(n) => {
                    self.trusts_everyone(f, p, n);
                    trusted_proxies.push(n);
                }
                Err(_) => self.error(
                    p.span(),
                    format!("`server.trusted_proxies` entry {raw:?} is not an IP address or CIDR such as \"10.0.0.0/8\""),
                ),
            }
        }
        if *server.workers.get_ref() > MAX_WORKERS {
            self.error(
                server.workers.span(),
                format!("`server.workers` must be at most {MAX_WORKERS} (0 = one per core)"),
            );
        }
        if server.header_read_timeout.get_ref().0.is_zero() {
            self.error(
                server.header_read_timeout.span(),
                "`server.header_read_timeout` must be positive".to_owned(),
            );
        }
        for t in std::iter::once(&f.defaults.request_timeout)
            .chain(f.tenants.values().map(|t| &t.request_timeout))
            .flatten()
        {
            if t.get_ref().0.is_zero() {
                self.error(t.span(), "`request_timeout` must be positive".to_owned());
            }
        }
        if server.limiter_prune_interval.get_ref().0.is_zero() {
            self.error(
                server.limiter_prune_interval.span(),
                "`server.limiter_prune_interval` must be positive".to_owned(),
            );
        }
        Server {
            listen,
            admin_listen,
            tls_listen,
            tls,
            trusted_proxies,
        }
    }

    /// A `trusted_proxies` entry of prefix length 0 (`0.0.0.0/0`, `::/0`) believes the
    /// `x-forwarded-for` of every client: each then picks the address its per-client
    /// limit counts against. A warning where a per-client rate is set (nothing else
    /// reads the client address).
    fn trusts_everyone(&mut self, f: &FileConfig, p: &Spanned<String>, net: ipnet::IpNet) {
        let per_client = std::iter::once(&f.defaults.limits)
            .chain(f.tenants.values().map(|t| &t.limits))
            .any(|l| l.per_client_requests_per_second.is_some());
        if net.prefix_len() == 0 && per_client {
            let fam = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
            self.warn(
                p.span(),
                format!("`server.trusted_proxies` entry {:?} trusts every {fam} address: the `x-forwarded-for` of any {fam} client is believed, so it names the address its per-client limit counts against (list the proxies' own addresses)", p.get_ref().trim()),
            );
        }
    }

    /// `server.state_dir`, relative to the config file's directory.
    pub(super) fn state_dir(&mut self, path: &Path, d: &Spanned<String>) -> PathBuf {
        let dir = path.parent().unwrap_or(Path::new("")).join(d.get_ref());
        if d.get_ref().is_empty() {
            self.error(d.span(), "`server.state_dir` must be a directory path (leave it out to keep quota counters in memory)".to_owned());
        } else if dir.exists() && !dir.is_dir() {
            // Created when missing; but a file there would fail every save.
            self.error(
                d.span(),
                format!(
                    "`server.state_dir` {:?} exists and is not a directory",
                    d.get_ref()
                ),
            );
        }
        dir
    }

    pub(super) fn audit_log(
        &mut self,
        config: &Path,
        raw: Option<&Spanned<String>>,
    ) -> Option<PathBuf> {
        let raw = raw?;
        if raw.get_ref().is_empty() {
            self.error(
                raw.span(),
                "`server.audit_log` must be a file path (leave it out to turn the audit log off)"
                    .to_owned(),
            );
            return None;
        }
        let file = config.parent().unwrap_or(Path::new("")).join(raw.get_ref());
        // The path's type, not opened (`check` must not block, nor make the file): a
        // FIFO, a device or a socket is refused where the gateway would refuse it (at
        // start, in a reload), with the same words.
        match std::fs::metadata(&file) {
            Ok(m) if m.is_dir() => self.error(
                raw.span(),
                format!(
                    "`server.audit_log` {:?} is a directory; name a file in it",
                    raw.get_ref()
                ),
            ),
            Ok(m) if !m.is_file() => self.error(
                raw.span(),
                audit_log_not_regular(raw.get_ref(), crate::file::kind(m.file_type())),
            ),
            Ok(_) => {}
            Err(_) => self.audit_log_dir(raw, &file),
        }
        // The log would be appended to the config itself (at start, and at every
        // reload): the file then fails to parse, and the next start fails.
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same(&file, config) {
            self.error(
                raw.span(),
                format!(
                    "`server.audit_log` {:?} is this configuration file; name another file",
                    raw.get_ref()
                ),
            );
        }
        Some(file)
    }

    /// The audit log is made when missing, but not its directory: the gateway would
    /// start, and apply every reload, without an audit line (a `warn` line each time).
    /// Valid, as at start; a warning at the key.
    fn audit_log_dir(&mut self, raw: &Spanned<String>, file: &Path) {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let what = match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                "is not a directory (a file stands in its path)"
            }
            Ok(m) if !m.is_dir() => "is not a directory",
            _ => return,
        };
        self.warn(
            raw.span(),
            format!(
                "`server.audit_log` {:?}: its directory {:?} {what}, so the file cannot be made: the gateway starts and reloads without writing the audit log (a `warn` line each time)",
                raw.get_ref(),
                dir.display().to_string()
            ),
        );
    }
}
