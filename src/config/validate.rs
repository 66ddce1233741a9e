//! The rules of SPEC.md that a file which reads as TOML must also meet, each a
//! [`Problem`] at the key's line and column: the checks across tables (names,
//! references, listeners, limits, cluster, TLS files), run after serde has read the
//! file.

use super::*;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) problems: Vec<Problem>,
}

impl Validator<'_> {
    pub(super) fn error(&mut self, span: std::ops::Range<usize>, message: String) {
        let (line, col) = line_col(self.text, span.start);
        self.problems.push(Problem { line, col, message });
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

    pub(super) fn validate(&mut self, path: &Path, text: &str, f: &FileConfig) -> Option<Config> {
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
        let mut tls_files = Vec::new();
        let tls = {
            let base = path.parent().unwrap_or(Path::new("."));
            let mut problems = Vec::new();
            let tls = crate::tls::validate_server(
                server,
                tls_listen,
                base,
                &mut tls_files,
                &mut |span, msg| problems.push((span, msg)),
            );
            for (span, msg) in problems {
                self.error(span, msg);
            }
            tls
        };
        if server.max_header_bytes.get_ref().0 < 1024 {
            self.error(
                server.max_header_bytes.span(),
                "`server.max_header_bytes` must be at least 1KiB".to_owned(),
            );
        }

        let mut trusted_proxies = Vec::new();
        for p in &server.trusted_proxies {
            let raw = p.get_ref().trim();
            let net = raw
                .parse::<ipnet::IpNet>()
                .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match net {
                Ok(n) => trusted_proxies.push(n),
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

        let t = &f.tenancy;
        if t.resolve.get_ref().is_empty() {
            self.error(
                t.resolve.span(),
                "`tenancy.resolve` must name at least one source".to_owned(),
            );
        }
        let mut seen = Vec::new();
        for s in t.resolve.get_ref() {
            if seen.contains(s) {
                self.error(
                    t.resolve.span(),
                    format!("`tenancy.resolve` names {:?} twice", s.name()),
                );
            }
            seen.push(*s);
        }
        self.header_name(&t.header, "tenancy.header", false);
        self.header_name(&t.jwt.header, "tenancy.jwt.header", false);
        // An empty claim name or cookie name names nothing: every token would be
        // refused for want of a tenant claim, and no cookie is called "".
        for (v, key) in [
            (Some(&t.jwt.tenant_claim), "tenancy.jwt.tenant_claim"),
            (t.jwt.cookie.as_ref(), "tenancy.jwt.cookie"),
        ] {
            if let Some(v) = v.filter(|v| v.get_ref().trim().is_empty()) {
                self.error(v.span(), format!("`{key}` must not be empty"));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let jwt_source = t.resolve.get_ref().contains(&SourceKind::Jwt);
        let jwt_global = match &t.jwt.jwks_file {
            Some(f) => match crate::jwt::load_jwks(f, base) {
                Ok(k) => Some(crate::jwt::ResolvedJwt {
                    keys: vec![k],
                    issuer: t.jwt.issuer.as_ref().map(|s| s.get_ref().clone()),
                    audience: t.jwt.audience.as_ref().map(|s| s.get_ref().clone()),
                    forward_claims: Vec::new(),
                }),
                Err((span, msg)) => {
                    self.error(span, format!("tenancy.jwt: {msg}"));
                    None
                }
            },
            None => {
                for (v, key) in [(&t.jwt.issuer, "issuer"), (&t.jwt.audience, "audience")] {
                    if let Some(v) = v {
                        self.error(
                            v.span(),
                            format!("`tenancy.jwt.{key}` applies to the issuer-wide keys of `tenancy.jwt.jwks_file`, which is not set: it would check no token (set `{key}` in each `[tenants.ID.jwt]` instead)"),
                        );
                    }
                }
                None
            }
        };
        self.header_name(&t.api_key.header, "tenancy.api_key.header", false);
        // Each credential source reads a header of its own: an API key in the token's
        // header would be read as a (broken) token, and the other way round.
        let mut read_by: Vec<(&Spanned<String>, &str)> = Vec::new();
        for (source, header, key) in [
            (SourceKind::Header, &t.header, "tenancy.header"),
            (SourceKind::Jwt, &t.jwt.header, "tenancy.jwt.header"),
            (
                SourceKind::ApiKey,
                &t.api_key.header,
                "tenancy.api_key.header",
            ),
        ] {
            if !t.resolve.get_ref().contains(&source) {
                continue;
            }
            if let Some((other, other_key)) = read_by
                .iter()
                .find(|(h, _)| h.get_ref().eq_ignore_ascii_case(header.get_ref()))
            {
                // At whichever of the two the file sets (a default has no position).
                let (set, set_key, same_key) = if header.span().is_empty() {
                    (*other, *other_key, key)
                } else {
                    (header, key, *other_key)
                };
                self.error(
                    set.span(),
                    format!("`{set_key}` and `{same_key}` are both {:?}: each source in `tenancy.resolve` needs a header of its own", set.get_ref()),
                );
            }
            read_by.push((header, key));
        }
        // The forwarded tenant id would replace a credential before the upstream saw it
        // (`Authorization` is forwarded unchanged, for backends that verify it).
        for (header, key) in read_by.iter().filter(|(_, k)| *k != "tenancy.header") {
            let forward = &t.forward_header;
            if !header.get_ref().eq_ignore_ascii_case(forward.get_ref()) {
                continue;
            }
            let (set, set_key, same_key) = if forward.span().is_empty() {
                (*header, *key, "tenancy.forward_header")
            } else {
                (forward, "tenancy.forward_header", *key)
            };
            self.error(
                set.span(),
                format!("`{set_key}` and `{same_key}` are both {:?}: the gateway sets the tenant id in `tenancy.forward_header`, which would replace the credential before the upstream sees it", set.get_ref()),
            );
        }
        if t.resolve.get_ref().contains(&SourceKind::Sni) && tls_listen.is_none() {
            self.error(
                t.resolve.span(),
                "`tenancy.resolve` names \"sni\" but `server.tls_listen` is not set: without TLS there is no SNI".to_owned(),
            );
        }
        // `forward_header = ""` turns tenant header injection off.
        if !t.forward_header.get_ref().is_empty() {
            self.header_name(&t.forward_header, "tenancy.forward_header", true);
        }
        let prefix = t.path_prefix.get_ref();
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 3 {
            self.error(
                t.path_prefix.span(),
                format!("`tenancy.path_prefix` must look like \"/t/\" (start and end with '/'), not {prefix:?}"),
            );
        } else if let Some(why) = not_in_a_path(prefix, "the \"path\" source reads the path") {
            self.error(
                t.path_prefix.span(),
                format!("`tenancy.path_prefix` {prefix:?} can never match: {why}"),
            );
        }

        // Upstreams.
        let mut upstreams = Vec::new();
        for (name, u) in &f.upstreams {
            if !valid_id(name.get_ref()) {
                self.error(
                    name.span(),
                    format!(
                        "upstream name {:?} must match [a-z0-9][a-z0-9_-]{{0,62}}",
                        name.get_ref()
                    ),
                );
            }
            if u.targets.get_ref().is_empty() {
                self.error(
                    u.targets.span(),
                    format!("upstream {:?} has no targets", name.get_ref()),
                );
            }
            let mut targets = Vec::new();
            let mut schemes = Vec::new();
            for target in u.targets.get_ref() {
                match parse_target(target.get_ref()) {
                    Ok((t, https)) => {
                        targets.push(t);
                        schemes.push(https);
                    }
                    Err(msg) => self.error(target.span(), msg),
                }
            }
            let https = schemes.first().copied().unwrap_or(false);
            if schemes.iter().any(|s| *s != https) {
                self.error(
                    u.targets.span(),
                    format!(
                        "upstream {:?} mixes http and https targets; use one scheme per upstream",
                        name.get_ref()
                    ),
                );
            }
            let insecure = u
                .tls_insecure_skip_verify
                .as_ref()
                .is_some_and(|b| *b.get_ref());
            if (u.ca.is_some() || insecure) && !https {
                let span = match (&u.ca, &u.tls_insecure_skip_verify) {
                    (Some(c), _) => c.span(),
                    (None, Some(b)) => b.span(),
                    (None, None) => 0..0,
                };
                self.error(
                    span,
                    format!("upstream {:?}: `ca` and `tls_insecure_skip_verify` apply to https:// targets only", name.get_ref()),
                );
            }
            let ca = u.ca.as_ref().and_then(|raw| {
                let base = path.parent().unwrap_or(Path::new("."));
                match crate::tls::load_ca(raw, base, &mut tls_files, "upstream") {
                    Ok(ca) => Some(ca),
                    Err((span, msg)) => {
                        self.error(span, format!("upstream {:?}: {msg}", name.get_ref()));
                        None
                    }
                }
            });
            upstreams.push(ResolvedUpstream {
                name: name.get_ref().clone(),
                targets,
                https,
                protocol: u.protocol,
                ca,
                insecure,
            });
        }
        let upstream_ok = |name: &str| {
            f.upstreams
                .get(name)
                .is_some_and(|u| !u.targets.get_ref().is_empty())
        };

        // Defaults.
        let d = &f.defaults;
        if let Some(u) = &d.upstream {
            if !upstream_ok(u.get_ref()) {
                self.missing_upstream(u, "[defaults] upstream");
            }
        }
        self.limits(&d.limits);

        // Tenants.
        let mut tenants = Vec::new();
        let mut host_owner: HashMap<HostPattern, &str> = HashMap::new();
        let mut key_owner: HashMap<crate::credentials::KeyDigest, &str> = HashMap::new();
        let api_key_source = t.resolve.get_ref().contains(&SourceKind::ApiKey);
        for (id, tc) in &f.tenants {
            let id_str = id.get_ref().as_str();
            if !valid_id(id_str) {
                self.error(
                    id.span(),
                    format!("tenant id {id_str:?} must match [a-z0-9][a-z0-9_-]{{0,62}}"),
                );
            }
            let mut hosts = Vec::new();
            for h in &tc.hosts {
                match parse_host_pattern(h.get_ref()) {
                    Ok(p) => {
                        if let Some(owner) = host_owner.get(&p) {
                            if *owner != id_str {
                                self.error(
                                    h.span(),
                                    format!(
                                        "host {:?} of tenant {id_str:?} already belongs to tenant {owner:?}: a host belongs to at most one tenant",
                                        p.to_string()
                                    ),
                                );
                            }
                        } else {
                            host_owner.insert(p.clone(), id_str);
                        }
                        if !hosts.contains(&p) {
                            hosts.push(p);
                        }
                    }
                    Err(msg) => self.error(h.span(), format!("tenant {id_str:?}: {msg}")),
                }
            }
            let upstream = match (&tc.upstream, &d.upstream) {
                (Some(u), _) => {
                    if !upstream_ok(u.get_ref()) {
                        self.missing_upstream(u, &format!("tenant {id_str:?}"));
                    }
                    u.get_ref().clone()
                }
                (None, Some(u)) => u.get_ref().clone(),
                (None, None) => {
                    self.error(
                        id.span(),
                        format!("tenant {id_str:?} names no `upstream` and `[defaults]` has none"),
                    );
                    String::new()
                }
            };
            let mut features = Vec::new();
            for feat in &tc.features {
                let s = feat.get_ref();
                // A space at either end would not survive the header value's trimming.
                if s.is_empty()
                    || s.contains(',')
                    || s.starts_with(' ')
                    || s.ends_with(' ')
                    || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                {
                    self.error(
                        feat.span(),
                        format!("feature {s:?} of tenant {id_str:?} must be printable ASCII without commas (spaces allowed inside, not at either end)"),
                    );
                }
                features.push(s.clone());
            }
            let mut routes = Vec::new();
            let mut prefixes: HashMap<String, usize> = HashMap::new();
            for r in &tc.routes {
                let p = r.prefix.get_ref();
                if !p.starts_with('/') {
                    self.error(
                        r.prefix.span(),
                        format!("route prefix {p:?} of tenant {id_str:?} must start with '/'"),
                    );
                } else if let Some(why) = not_in_a_path(p, "routes match the path") {
                    self.error(
                        r.prefix.span(),
                        format!("route prefix {p:?} of tenant {id_str:?} can never match: {why}"),
                    );
                } else {
                    let normal = crate::snapshot::route_path(p);
                    // Only the case of hex digits may differ (`%2f`): taken as `%2F`.
                    if !normal.eq_ignore_ascii_case(p) {
                        self.error(
                            r.prefix.span(),
                            format!("route prefix {p:?} of tenant {id_str:?} can never match: paths are normalised before routes match them (repeated '/' merged, '.' and '..' segments resolved, %XX of unreserved characters decoded); write {normal:?}"),
                        );
                    } else if let Some(first) = prefixes.get(&*normal) {
                        self.error(
                            r.prefix.span(),
                            format!("route prefix {p:?} of tenant {id_str:?} is also the prefix of an earlier route (line {first}), which takes every request it matches: this route would never be used"),
                        );
                    } else {
                        let line = line_col(self.text, r.prefix.span().start).0;
                        prefixes.insert(normal.into_owned(), line);
                    }
                }
                if !upstream_ok(r.upstream.get_ref()) {
                    self.missing_upstream(&r.upstream, &format!("a route of tenant {id_str:?}"));
                }
                routes.push((p.clone(), r.upstream.get_ref().clone()));
            }
            self.limits(&tc.limits);
            let mut api_keys = Vec::new();
            for k in &tc.api_keys {
                match crate::credentials::parse_digest(k.get_ref()) {
                    Ok(d) => {
                        match key_owner.get(&d) {
                            Some(owner) if *owner != id_str => self.error(
                                k.span(),
                                format!("an api key of tenant {id_str:?} is also a key of tenant {owner:?}: a key names one tenant"),
                            ),
                            Some(_) => {}
                            None => {
                                key_owner.insert(d, id_str);
                            }
                        }
                        api_keys.push(d);
                    }
                    Err(msg) => self.error(k.span(), format!("tenant {id_str:?}: {msg}")),
                }
            }
            if !tc.api_keys.is_empty() && !api_key_source {
                self.error(
                    tc.api_keys[0].span(),
                    format!("tenant {id_str:?} has `api_keys` but `tenancy.resolve` has no \"api_key\" source to read them"),
                );
            }
            let jwt = tc.jwt.as_ref().map(|j| {
                let keys = match crate::jwt::load_tenant_keys(j, base) {
                    Ok(k) if k.is_empty() => {
                        self.error(
                            id.span(),
                            format!("`[tenants.{id_str}.jwt]` has no keys: set `hs256_secret_env`, `hs256_secret_file`, `public_keys` or `jwks_file` (without one no token of the tenant verifies)"),
                        );
                        k
                    }
                    Ok(k) => k,
                    Err((span, msg)) => {
                        self.error(span, format!("tenant {id_str:?}: {msg}"));
                        Vec::new()
                    }
                };
                if !jwt_source {
                    self.error(
                        id.span(),
                        format!("tenant {id_str:?} has `[tenants.{id_str}.jwt]` keys but `tenancy.resolve` has no \"jwt\" source to verify tokens with them"),
                    );
                }
                let mut forward_claims: Vec<(String, String)> = Vec::new();
                for (claim, header) in &j.forward_claims {
                    self.header_name(header, "forward_claims", true);
                    self.not_an_identity_header(header, "forward_claims", t, &read_by);
                    let lower = header.get_ref().to_ascii_lowercase();
                    if let Some((other, _)) = forward_claims.iter().find(|(_, h)| *h == lower) {
                        self.error(
                            header.span(),
                            format!("`forward_claims` sends claims {other:?} and {claim:?} both in {:?}: one header per claim", header.get_ref()),
                        );
                    }
                    forward_claims.push((claim.clone(), lower));
                }
                crate::jwt::ResolvedJwt {
                    keys,
                    issuer: j.issuer.clone(),
                    audience: j.audience.clone(),
                    forward_claims,
                }
            });
            let tenant_tls = tc.tls.as_ref().and_then(|tt| {
                let mut problems = Vec::new();
                let r = crate::tls::validate_tenant(
                    id_str,
                    tt,
                    &hosts,
                    tls_listen.is_some() && tls.is_some(),
                    base,
                    &mut tls_files,
                    &mut |span, msg| problems.push((span, msg)),
                );
                for (span, msg) in problems {
                    self.error(span, msg);
                }
                r
            });
            if let Some(h) = tc
                .tls
                .as_ref()
                .and_then(|tt| tt.forward_client_cert.as_ref())
            {
                self.not_an_identity_header(h, "tls.forward_client_cert", t, &read_by);
            }
            let require = tc.require.as_ref().map_or(&[][..], |r| r.get_ref());
            let require_span = tc.require.as_ref().map_or(id.span(), |r| r.span());
            for (i, kind) in require.iter().enumerate() {
                // A kind named twice is one problem, said once.
                if require[..i].contains(kind) {
                    continue;
                }
                match kind {
                    CredentialKind::Jwt
                        if !jwt_source
                            || (jwt.as_ref().is_none_or(|j| j.keys.is_empty())
                                && jwt_global.is_none()) =>
                    {
                        self.error(
                            require_span.clone(),
                            format!("tenant {id_str:?} requires \"jwt\" but has no `[tenants.{id_str}.jwt]` keys and no `[tenancy.jwt] jwks_file`, or `tenancy.resolve` has no \"jwt\" source: no request could ever pass"),
                        )
                    }
                    CredentialKind::Jwt => {}
                    CredentialKind::ApiKey if !api_key_source || tc.api_keys.is_empty() => {
                        self.error(
                            require_span.clone(),
                            format!("tenant {id_str:?} requires \"api_key\" but has no `api_keys` or `tenancy.resolve` has no \"api_key\" source: no request could ever pass"),
                        )
                    }
                    CredentialKind::ApiKey => {}
                }
            }
            tenants.push(ResolvedTenant {
                id: id_str.to_owned(),
                hosts,
                upstream,
                request_timeout: tc
                    .request_timeout
                    .as_ref()
                    .or(d.request_timeout.as_ref())
                    .map_or(Duration::from_secs(30), |d| d.get_ref().0),
                features,
                status: tc.status,
                limits: merge_limits(&tc.limits, &d.limits),
                routes,
                api_keys,
                require: require.to_vec(),
                jwt,
                tls: tenant_tls,
            });
        }

        let cluster = self.cluster(f);
        if cluster.is_none() {
            self.cluster_scope_needs_redis(f);
        }
        self.store_failure_needs_cluster_scope(f);
        self.burst_needs_rate(f);
        let state_dir = server.state_dir.as_ref().map(|d| {
            let dir = path.parent().unwrap_or(Path::new("")).join(d.get_ref());
            if d.get_ref().is_empty() {
                self.error(d.span(), "`server.state_dir` must be a directory path (leave it out to keep quota counters in memory)".to_owned());
            } else if dir.exists() && !dir.is_dir() {
                // Created when missing; but a file there would fail every save.
                self.error(
                    d.span(),
                    format!("`server.state_dir` {:?} exists and is not a directory", d.get_ref()),
                );
            }
            dir
        });

        Some(Config {
            path: path.to_owned(),
            version: version_with_files(
                text,
                &tls_fingerprints(tls.as_ref(), &tenants, &upstreams),
            ),
            listen: listen?,
            admin_listen: admin_listen?,
            workers: *server.workers.get_ref(),
            shutdown_grace: server.shutdown_grace.0,
            header_read_timeout: server.header_read_timeout.get_ref().0,
            max_header_bytes: server.max_header_bytes.get_ref().0,
            tunnel_idle_timeout: Some(server.tunnel_idle_timeout.0).filter(|d| !d.is_zero()),
            body_idle_timeout: Some(server.body_idle_timeout.0).filter(|d| !d.is_zero()),
            max_connections: server.max_connections,
            log_format: server.log_format,
            audit_log: self.audit_log(path, server.audit_log.as_ref()),
            trusted_proxies,
            limiter_prune_interval: server.limiter_prune_interval.get_ref().0,
            access_log: server.access_log,
            metrics: server.metrics,
            tls_listen,
            redirect_http: *server.redirect_http.get_ref(),
            tls,
            tls_files,
            resolve: t.resolve.get_ref().clone(),
            api_key_header: t.api_key.header.get_ref().to_ascii_lowercase(),
            jwt_header: t.jwt.header.get_ref().to_ascii_lowercase(),
            tenant_claim: t.jwt.tenant_claim.get_ref().clone(),
            jwt_cookie: t.jwt.cookie.as_ref().map(|c| c.get_ref().clone()),
            jwt_leeway: t.jwt.leeway.0,
            jwt_global,
            tenant_header: t.header.get_ref().to_ascii_lowercase(),
            path_prefix: t.path_prefix.get_ref().clone(),
            forward_header: t.forward_header.get_ref().to_ascii_lowercase(),
            upstreams,
            tenants,
            cluster,
            state_dir,
        })
    }

    /// `[cluster]`, validated; `None` without one or without `redis`.
    fn cluster(&mut self, f: &FileConfig) -> Option<ClusterSettings> {
        let c = f.cluster.as_ref()?;
        let span = c.span();
        let c = c.get_ref();
        let Some(redis) = &c.redis else {
            self.error(
                span,
                "[cluster] needs `redis`, e.g. redis = \"redis://127.0.0.1:6379/0\"".to_owned(),
            );
            return None;
        };
        let nodes = match redis.get_ref() {
            RedisNodes::One(u) => vec![u.clone()],
            RedisNodes::Many(v) => v.clone(),
        };
        if nodes.is_empty() {
            self.error(redis.span(), "`cluster.redis` names no node".to_owned());
        }
        let mut tls_modes = Vec::new();
        let mut seeds = Vec::new();
        for url in &nodes {
            // Messages name the node without its password: they reach the log, a
            // reload's 422 answer and `GET /config/history`.
            let n = without_password(url);
            // Our own reading first: redis-rs says "Redis URL did not parse" for most
            // mistakes (a bad port, a missing host, a scheme it does not take).
            if let Some(why) = redis_url_problem(url, &n, nodes.len() > 1) {
                self.error(redis.span(), format!("`cluster.redis`: {why}"));
                continue;
            }
            match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                // What the reading above does not look at (a `?protocol=` it does not
                // know, a password that is not UTF-8 once decoded), in its words.
                Err(e) => self.error(
                    redis.span(),
                    format!("`cluster.redis`: the Redis client refuses {n:?}: {e}"),
                ),
                Ok(info) => {
                    tls_modes.push(matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }));
                    seeds.push((n, info));
                }
            }
        }
        if nodes.len() > 1 {
            self.cluster_seeds(redis.span(), &seeds);
        }
        if tls_modes.iter().any(|t| *t) && tls_modes.iter().any(|t| !*t) {
            self.error(
                redis.span(),
                "`cluster.redis` mixes redis:// and rediss:// nodes: the nodes of one cluster are all reached with TLS or all without".to_owned(),
            );
        }
        let dur = |d: &Option<Spanned<Dur>>, default_ms: u64| {
            d.as_ref()
                .map_or((0..0, Duration::from_millis(default_ms)), |d| {
                    (d.span(), d.get_ref().0)
                })
        };
        let (sync_span, sync_interval) = dur(&c.sync_interval, 50);
        let (timeout_span, store_timeout) = dur(&c.store_timeout, 20);
        if sync_interval < Duration::from_millis(1) || sync_interval > Duration::from_secs(60) {
            self.error(
                sync_span,
                "`cluster.sync_interval` must be between 1ms and 60s".to_owned(),
            );
        }
        if store_timeout < Duration::from_millis(1) || store_timeout > Duration::from_secs(10) {
            self.error(
                timeout_span,
                "`cluster.store_timeout` must be between 1ms and 10s".to_owned(),
            );
        }
        let instance_id = match &c.instance_id {
            Some(id)
                if id.get_ref().trim().is_empty()
                    || id.get_ref().chars().count() > 128
                    || id.get_ref().chars().any(char::is_control) =>
            {
                self.error(
                    id.span(),
                    "`cluster.instance_id` must be 1 to 128 characters, not all spaces, no control characters".to_owned(),
                );
                String::new()
            }
            Some(id) => id.get_ref().clone(),
            None => hostname(),
        };
        Some(ClusterSettings {
            nodes,
            instance_id,
            sync_interval,
            store_timeout,
        })
    }

    /// `on_store_failure` says what a cluster-scope tenant gets while Redis is away; on
    /// a table whose limits are local it would say nothing, silently.
    fn store_failure_needs_cluster_scope(&mut self, f: &FileConfig) {
        let cluster = |l: &LimitsConfig| {
            l.scope
                .as_ref()
                .is_some_and(|s| *s.get_ref() == Scope::Cluster)
        };
        let defaults_cluster = cluster(&f.defaults.limits);
        let any_cluster = defaults_cluster || f.tenants.values().any(|t| cluster(&t.limits));
        if let Some(o) = &f.defaults.limits.on_store_failure {
            if !any_cluster {
                self.error(
                    o.span(),
                    "[defaults.limits] on_store_failure applies to scope = \"cluster\" limits, and no table has them: it would change nothing".to_owned(),
                );
            }
        }
        for (id, t) in &f.tenants {
            let scoped = match &t.limits.scope {
                Some(s) => *s.get_ref() == Scope::Cluster,
                None => defaults_cluster,
            };
            if let (Some(o), false) = (&t.limits.on_store_failure, scoped) {
                self.error(
                    o.span(),
                    format!("[tenants.{}.limits] on_store_failure applies to scope = \"cluster\" limits, and this tenant's are local: it would change nothing", id.get_ref()),
                );
            }
        }
    }

    /// A `burst` sizes the bucket of a rate: one that no table's rate goes with
    /// limits nothing, where its author meant a limit.
    fn burst_needs_rate(&mut self, f: &FileConfig) {
        // Each burst of a limits table, whether the table sets its rate, and their keys.
        let bursts = |l: &LimitsConfig| {
            [
                (
                    l.burst.clone(),
                    l.requests_per_second.is_some(),
                    "burst",
                    "requests_per_second",
                ),
                (
                    l.per_client_burst.clone(),
                    l.per_client_requests_per_second.is_some(),
                    "per_client_burst",
                    "per_client_requests_per_second",
                ),
            ]
        };
        // An invalid burst has its own error.
        let valid = |b: Option<Spanned<u64>>| b.filter(|b| valid_burst(*b.get_ref()));
        let defaults = bursts(&f.defaults.limits);
        for (i, (burst, rate, bkey, rkey)) in defaults.iter().cloned().enumerate() {
            let Some(b) = valid(burst) else { continue };
            // Taken by a tenant with a rate of its own and no burst of its own.
            let taken = rate
                || f.tenants.values().any(|t| {
                    let (own_burst, own_rate, ..) = &bursts(&t.limits)[i];
                    *own_rate && own_burst.is_none()
                });
            if !taken {
                self.error(
                    b.span(),
                    format!("[defaults.limits] {bkey} goes with no `{rkey}`, here or in a tenant without a {bkey} of its own: it would limit nothing"),
                );
            }
        }
        for (id, t) in &f.tenants {
            for (i, (burst, rate, bkey, rkey)) in bursts(&t.limits).into_iter().enumerate() {
                let Some(b) = valid(burst) else { continue };
                if !rate && !defaults[i].1 {
                    self.error(
                        b.span(),
                        format!("[tenants.{}.limits] {bkey} without `{rkey}` (here or in [defaults.limits]) would limit nothing: set the rate, or leave the {bkey} out", id.get_ref()),
                    );
                }
            }
        }
    }

    /// The seed nodes of a Redis Cluster (`n`, the URL with its user and password
    /// masked, and what the client reads from it). redis-rs's cluster client reaches
    /// every node, the seeds and the ones the cluster announces, as the first seed
    /// says: its user, password, protocol and database. It refuses a later seed that
    /// names another only when connecting, and not at all when the first names none
    /// (the others' password was dropped, and Redis answered NOAUTH). A database other
    /// than 0 is refused by Redis Cluster itself (`SELECT is not allowed in cluster
    /// mode`), on every connection.
    fn cluster_seeds(
        &mut self,
        span: std::ops::Range<usize>,
        seeds: &[(String, redis::ConnectionInfo)],
    ) {
        let Some((first_n, first)) = seeds.first() else {
            return;
        };
        let a = first.redis_settings();
        for (n, info) in &seeds[1..] {
            let b = info.redis_settings();
            let differs: Vec<&str> = [
                (a.username() != b.username(), "user"),
                (a.password() != b.password(), "password"),
                (a.protocol() != b.protocol(), "protocol (?protocol=)"),
            ]
            .into_iter()
            .filter_map(|(d, what)| d.then_some(what))
            .collect();
            if !differs.is_empty() {
                self.error(
                    span.clone(),
                    format!(
                        "`cluster.redis`: {n:?} differs from {first_n:?} in its {}; the client reaches every node of a Redis Cluster (the seeds and the nodes the cluster announces) with one user, password and protocol, the first seed's, so the seeds name the same",
                        differs.join(" and ")
                    ),
                );
            }
        }
        let with_db: Vec<String> = seeds
            .iter()
            .filter(|(_, info)| info.redis_settings().db() != 0)
            .map(|(n, info)| format!("{n:?} (database {})", info.redis_settings().db()))
            .collect();
        if !with_db.is_empty() {
            self.error(
                span,
                format!(
                    "`cluster.redis`: a Redis Cluster has only database 0 (it refuses SELECT of another), so its seed nodes name /0 or no database, not {}",
                    with_db.join(", ")
                ),
            );
        }
    }

    /// Without a usable `[cluster] redis`, no `scope = "cluster"` can work.
    fn cluster_scope_needs_redis(&mut self, f: &FileConfig) {
        let tables = std::iter::once(("[defaults.limits]".to_owned(), &f.defaults.limits)).chain(
            f.tenants
                .iter()
                .map(|(id, t)| (format!("[tenants.{}.limits]", id.get_ref()), &t.limits)),
        );
        for (table, l) in tables {
            if let Some(s) = l.scope.as_ref().filter(|s| *s.get_ref() == Scope::Cluster) {
                self.error(
                    s.span(),
                    format!("{table} scope = \"cluster\" needs `redis` in a [cluster] table (a redis:// URL shared by every instance)"),
                );
            }
        }
    }

    fn audit_log(&mut self, config: &Path, raw: Option<&Spanned<String>>) -> Option<PathBuf> {
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
            _ => {}
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

    fn missing_upstream(&mut self, u: &Spanned<String>, who: &str) {
        self.error(
            u.span(),
            format!(
                "{who} names upstream {:?}, which is not defined in [upstreams] or has no targets",
                u.get_ref()
            ),
        );
    }

    fn limits(&mut self, l: &LimitsConfig) {
        for (key, r) in [
            ("requests_per_second", &l.requests_per_second),
            (
                "per_client_requests_per_second",
                &l.per_client_requests_per_second,
            ),
        ] {
            if let Some(r) = r {
                let v = r.get_ref().0;
                // Below 1e-9 (one request in 32 years) the time per request no longer
                // fits a `Duration`: building the limiter would panic.
                if !(v.is_finite() && (1e-9..=1e9).contains(&v)) {
                    self.error(
                        r.span(),
                        format!(
                            "`{key}` must be between 1e-9 and 1e9 (requests per second), not {v}"
                        ),
                    );
                }
            }
        }
        for (key, b) in [
            ("burst", &l.burst),
            ("per_client_burst", &l.per_client_burst),
        ] {
            if let Some(b) = b {
                if !valid_burst(*b.get_ref()) {
                    self.error(
                        b.span(),
                        format!("`{key}` must be at least 1 (and fit in 32 bits)"),
                    );
                }
            }
        }
        if let Some(b) = &l.max_body {
            if b.get_ref().0 < 1 {
                self.error(b.span(), "`max_body` must be positive".to_owned());
            }
        }
        if let Some(m) = &l.max_in_flight {
            if *m.get_ref() < 1 {
                self.error(m.span(), "`max_in_flight` must be positive".to_owned());
            }
        }
        for (key, q) in [
            ("requests_per_day", &l.requests_per_day),
            ("requests_per_month", &l.requests_per_month),
        ] {
            if let Some(q) = q {
                if *q.get_ref() < 1 || *q.get_ref() > 1 << 50 {
                    self.error(
                        q.span(),
                        format!("`{key}` must be at least 1 (and at most 2^50)"),
                    );
                }
            }
        }
    }
}
