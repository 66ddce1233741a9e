//! The rules of SPEC.md that a file which reads as TOML must also meet, each a
//! [`Problem`] at the key's line and column: the checks across tables (names,
//! references, listeners, limits, cluster, TLS files), run after serde has read the
//! file. [`Validator::validate`] runs them part by part, in the file's order of
//! topics, one submodule each: `server`, `tenancy`, `upstreams`, `tenants`, `limits`,
//! `cluster`.

use super::*;

mod cluster;
mod limits;
mod server;
mod tenancy;
mod tenants;
mod upstreams;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) problems: Vec<Problem>,
    /// Settings that apply but do not do what they say: `bulkhead check` prints them
    /// as warnings ([`Config::warnings`]).
    pub(super) warnings: Vec<Problem>,
}

impl Validator<'_> {
    pub(super) fn error(&mut self, span: std::ops::Range<usize>, message: String) {
        let (line, col) = line_col(self.text, span.start);
        self.problems.push(Problem { line, col, message });
    }

    /// A warning at `span`: the file applies, but `message` says what will not work.
    pub(super) fn warn(&mut self, span: std::ops::Range<usize>, message: String) {
        let (line, col) = line_col(self.text, span.start);
        self.warnings.push(Problem { line, col, message });
    }

    pub(super) fn into_error(mut self, path: &Path) -> ConfigError {
        self.problems.sort_by_key(|p| (p.line, p.col));
        ConfigError {
            path: path.to_owned(),
            problems: self.problems,
        }
    }

    fn addr(&mut self, s: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    s.span(),
                    format!(
                        "`{key}` must be an IP address and port such as \"127.0.0.1:8080\", not {:?}",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A header name from the file. `sets`: the gateway sets it on forwarded requests
    /// (otherwise it reads it from the client), see [`crate::headers::reserved`].
    fn header_name(&mut self, s: &Spanned<String>, key: &str, sets: bool) {
        match http::HeaderName::from_bytes(s.get_ref().as_bytes()) {
            Ok(name) => {
                if let Some(why) = crate::headers::reserved(name.as_str(), sets) {
                    self.error(
                        s.span(),
                        format!("`{key}` cannot be {:?}: {why}", s.get_ref()),
                    );
                }
            }
            Err(_) => self.error(
                s.span(),
                format!("`{key}` is not a valid header name: {:?}", s.get_ref()),
            ),
        }
    }

    /// A header the gateway sets from a claim or a certificate must not be one that
    /// says which tenant a request belongs to: the tenant id it forwards, or one a
    /// credential source reads (a backend trusting `forward_header` would take a
    /// token's `sub` for the tenant).
    fn not_an_identity_header(
        &mut self,
        s: &Spanned<String>,
        key: &str,
        t: &TenancyConfig,
        read_by: &[(&Spanned<String>, &str)],
    ) {
        let name = s.get_ref();
        let what = if name.eq_ignore_ascii_case(t.forward_header.get_ref()) {
            Some("tenancy.forward_header")
        } else {
            read_by
                .iter()
                .find(|(h, _)| h.get_ref().eq_ignore_ascii_case(name))
                .map(|(_, k)| *k)
        };
        if let Some(what) = what {
            self.error(
                s.span(),
                format!("`{key}` cannot be {name:?}: it is `{what}`, which names the tenant"),
            );
        }
    }

    /// Every rule, part by part; the `Config` when the parts it is made of are valid
    /// (the caller refuses it anyway when a rule found a problem).
    pub(super) fn validate(&mut self, path: &Path, text: &str, f: &FileConfig) -> Option<Config> {
        let server = &f.server;
        let mut tls_files = Vec::new();
        let s = self.server(path, f, &mut tls_files);
        let t = &f.tenancy;
        let base = path.parent().unwrap_or(Path::new("."));
        let tenancy = self.tenancy(t, base, s.tls_listen);
        let upstreams = self.upstreams(path, f, &mut tls_files);

        // Defaults.
        let d = &f.defaults;
        if let Some(u) = &d.upstream {
            if !upstreams::upstream_ok(f, u.get_ref()) {
                self.missing_upstream(u, "[defaults] upstream");
            }
        }
        self.limits(&d.limits);

        let cx = tenants::Context {
            f,
            tenancy: &tenancy,
            base,
            tls_served: s.tls_listen.is_some() && s.tls.is_some(),
        };
        let tenants = self.tenants(&cx, &mut tls_files);

        let cluster = self.cluster(f);
        if cluster.is_none() {
            self.cluster_scope_needs_redis(f);
        }
        self.store_failure_needs_cluster_scope(f);
        self.burst_needs_rate(f);
        self.day_quota_over_month(f);
        let state_dir = server.state_dir.as_ref().map(|d| self.state_dir(path, d));
        // Before the listeners' `?` below, or a bad listener hid its problems.
        let audit_log = self.audit_log(path, server.audit_log.as_ref());

        Some(Config {
            path: path.to_owned(),
            version: version_with_files(
                text,
                &tls_fingerprints(s.tls.as_ref(), &tenants, &upstreams),
            ),
            listen: s.listen?,
            admin_listen: s.admin_listen?,
            workers: *server.workers.get_ref(),
            shutdown_grace: server.shutdown_grace.0,
            header_read_timeout: server.header_read_timeout.get_ref().0,
            max_header_bytes: server.max_header_bytes.get_ref().0,
            tunnel_idle_timeout: Some(server.tunnel_idle_timeout.0).filter(|d| !d.is_zero()),
            body_idle_timeout: Some(server.body_idle_timeout.0).filter(|d| !d.is_zero()),
            max_connections: server.max_connections,
            log_format: server.log_format,
            audit_log,
            trusted_proxies: s.trusted_proxies,
            limiter_prune_interval: server.limiter_prune_interval.get_ref().0,
            access_log: server.access_log,
            metrics: server.metrics,
            tls_listen: s.tls_listen,
            redirect_http: *server.redirect_http.get_ref(),
            tls: s.tls,
            tls_files,
            resolve: t.resolve.get_ref().clone(),
            api_key_header: t.api_key.header.get_ref().to_ascii_lowercase(),
            jwt_header: t.jwt.header.get_ref().to_ascii_lowercase(),
            tenant_claim: t.jwt.tenant_claim.get_ref().clone(),
            jwt_cookie: t.jwt.cookie.as_ref().map(|c| c.get_ref().clone()),
            jwt_leeway: t.jwt.leeway.get_ref().0,
            jwt_global: tenancy.jwt_global,
            tenant_header: t.header.get_ref().to_ascii_lowercase(),
            path_prefix: t.path_prefix.get_ref().clone(),
            forward_header: t.forward_header.get_ref().to_ascii_lowercase(),
            upstreams,
            tenants,
            cluster,
            state_dir,
            warnings: {
                let mut w = std::mem::take(&mut self.warnings);
                w.sort_by_key(|p| (p.line, p.col));
                w
            },
        })
    }
}
