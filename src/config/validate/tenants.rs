//! `[tenants.ID]`: ids, hosts, the upstream and routes, features, API keys, JWT keys,
//! TLS and `require`, each tenant with `[defaults]` merged in.

use std::collections::HashMap;

use super::tenancy::Tenancy;
use super::upstreams::upstream_ok;
use super::*;

/// What every tenant is checked against: the file, and the parts of it validated
/// before the tenants.
pub(super) struct Context<'f> {
    pub(super) f: &'f FileConfig,
    pub(super) tenancy: &'f Tenancy<'f>,
    /// The config file's directory, that relative key and certificate files are read from.
    pub(super) base: &'f Path,
    /// `server.tls_listen` and `[server.tls]` are both set (and valid).
    pub(super) tls_served: bool,
}

/// Who holds each host and each API key so far, in file order.
#[derive(Default)]
struct Owners<'f> {
    hosts: HashMap<HostPattern, &'f str>,
    keys: HashMap<crate::credentials::KeyDigest, &'f str>,
}

impl Validator<'_> {
    /// Every tenant, in file order. `tls_files` gets each tenant's certificate, key
    /// and client CA files.
    pub(super) fn tenants(
        &mut self,
        cx: &Context<'_>,
        tls_files: &mut Vec<PathBuf>,
    ) -> Vec<ResolvedTenant> {
        let mut tenants = Vec::new();
        let mut owners = Owners::default();
        for (id, tc) in &cx.f.tenants {
            tenants.push(self.tenant(cx, &mut owners, id, tc, tls_files));
        }
        tenants
    }

    fn tenant<'f>(
        &mut self,
        cx: &Context<'_>,
        owners: &mut Owners<'f>,
        id: &'f Spanned<String>,
        tc: &TenantConfig,
        tls_files: &mut Vec<PathBuf>,
    ) -> ResolvedTenant {
        let d = &cx.f.defaults;
        let t = &cx.f.tenancy;
        let id_str = id.get_ref().as_str();
        if !valid_id(id_str) {
            self.error(
                id.span(),
                format!("tenant id {id_str:?} must match [a-z0-9][a-z0-9_-]{{0,62}}"),
            );
        }
        let hosts = self.hosts(id_str, tc, &mut owners.hosts);
        let upstream = match (&tc.upstream, &d.upstream) {
            (Some(u), _) => {
                if !upstream_ok(cx.f, u.get_ref()) {
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
        let features = self.features(id_str, tc);
        let routes = self.routes(cx.f, id_str, tc);
        self.limits(&tc.limits);
        let api_key_source = t.resolve.get_ref().contains(&SourceKind::ApiKey);
        let api_keys = self.api_keys(id_str, tc, &mut owners.keys);
        if !tc.api_keys.is_empty() && !api_key_source {
            self.error(
                tc.api_keys[0].span(),
                format!("tenant {id_str:?} has `api_keys` but `tenancy.resolve` has no \"api_key\" source to read them"),
            );
        }
        let jwt_source = t.resolve.get_ref().contains(&SourceKind::Jwt);
        let jwt = tc
            .jwt
            .as_ref()
            .map(|j| self.tenant_jwt(cx, id, j, jwt_source));
        let tenant_tls = tc.tls.as_ref().and_then(|tt| {
            let mut problems = Vec::new();
            let r = crate::tls::validate_tenant(
                id_str,
                tt,
                &hosts,
                cx.tls_served,
                cx.base,
                tls_files,
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
            self.not_an_identity_header(h, "tls.forward_client_cert", t, &cx.tenancy.read_by);
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
                            && cx.tenancy.jwt_global.is_none()) =>
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
        self.unreachable(cx, id, &hosts, &api_keys, jwt.as_ref());
        ResolvedTenant {
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
        }
    }

    /// A tenant that no source in `tenancy.resolve` can name gets only 404
    /// `unknown_tenant`. Valid (a tenant set up ahead of its hosts or keys); a warning.
    fn unreachable(
        &mut self,
        cx: &Context<'_>,
        id: &Spanned<String>,
        hosts: &[HostPattern],
        api_keys: &[crate::credentials::KeyDigest],
        jwt: Option<&crate::jwt::ResolvedJwt>,
    ) {
        let mut lacks = Vec::new();
        for source in cx.f.tenancy.resolve.get_ref() {
            let lack = match source {
                SourceKind::Header | SourceKind::Path => return,
                SourceKind::Host | SourceKind::Sni if !hosts.is_empty() => return,
                SourceKind::Host | SourceKind::Sni => "it has no `hosts`",
                SourceKind::ApiKey if !api_keys.is_empty() => return,
                SourceKind::ApiKey => "it has no `api_keys`",
                SourceKind::Jwt
                    if jwt.is_some_and(|j| !j.keys.is_empty())
                        || cx.tenancy.jwt_global.is_some() =>
                {
                    return
                }
                SourceKind::Jwt => "it has no JWT keys, nor has `[tenancy.jwt]` a `jwks_file`",
            };
            lacks.push(format!("{:?}: {lack}", source.name()));
        }
        // No source at all is an error of its own.
        if !lacks.is_empty() {
            self.warn(
                id.span(),
                format!(
                    "tenant {:?} can be named by no source in `tenancy.resolve` ({}): every request meant for it is 404 `unknown_tenant`",
                    id.get_ref(),
                    lacks.join("; ")
                ),
            );
        }
    }

    /// The tenant's `hosts`, normalised, each at most once; `owners`: the tenant each
    /// host went to first.
    fn hosts<'f>(
        &mut self,
        id_str: &'f str,
        tc: &TenantConfig,
        owners: &mut HashMap<HostPattern, &'f str>,
    ) -> Vec<HostPattern> {
        let mut hosts = Vec::new();
        for h in &tc.hosts {
            match parse_host_pattern(h.get_ref()) {
                Ok(p) => {
                    if let Some(owner) = owners.get(&p) {
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
                        owners.insert(p.clone(), id_str);
                    }
                    if !hosts.contains(&p) {
                        hosts.push(p);
                    }
                }
                Err(msg) => self.error(h.span(), format!("tenant {id_str:?}: {msg}")),
            }
        }
        hosts
    }

    fn features(&mut self, id_str: &str, tc: &TenantConfig) -> Vec<String> {
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
            if features.contains(s) {
                self.warn(
                    feat.span(),
                    format!(
                        "feature {s:?} of tenant {id_str:?} is listed twice: it is forwarded once"
                    ),
                );
                continue;
            }
            features.push(s.clone());
        }
        features
    }

    /// `(prefix, upstream)`, in file order.
    fn routes(&mut self, f: &FileConfig, id_str: &str, tc: &TenantConfig) -> Vec<(String, String)> {
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
            if !upstream_ok(f, r.upstream.get_ref()) {
                self.missing_upstream(&r.upstream, &format!("a route of tenant {id_str:?}"));
            }
            routes.push((p.clone(), r.upstream.get_ref().clone()));
        }
        routes
    }

    /// The tenant's key digests; `owners`: the tenant each key went to first.
    fn api_keys<'f>(
        &mut self,
        id_str: &'f str,
        tc: &TenantConfig,
        owners: &mut HashMap<crate::credentials::KeyDigest, &'f str>,
    ) -> Vec<crate::credentials::KeyDigest> {
        let mut api_keys = Vec::new();
        for k in &tc.api_keys {
            match crate::credentials::parse_digest(k.get_ref()) {
                Ok(d) => {
                    match owners.get(&d) {
                        Some(owner) if *owner != id_str => self.error(
                            k.span(),
                            format!("an api key of tenant {id_str:?} is also a key of tenant {owner:?}: a key names one tenant"),
                        ),
                        Some(_) => {}
                        None => {
                            owners.insert(d, id_str);
                        }
                    }
                    api_keys.push(d);
                }
                Err(msg) => self.error(k.span(), format!("tenant {id_str:?}: {msg}")),
            }
        }
        api_keys
    }

    /// `[tenants.ID.jwt]`: its keys and the headers its claims are forwarded in.
    fn tenant_jwt(
        &mut self,
        cx: &Context<'_>,
        id: &Spanned<String>,
        j: &crate::jwt::TenantJwtConfig,
        jwt_source: bool,
    ) -> crate::jwt::ResolvedJwt {
        let id_str = id.get_ref().as_str();
        let keys = match crate::jwt::load_tenant_keys(j, cx.base) {
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
        for (v, key) in [(&j.issuer, "issuer"), (&j.audience, "audience")] {
            self.not_blank_claim(v.as_ref(), &format!("[tenants.{id_str}.jwt] {key}"));
        }
        let mut forward_claims: Vec<(String, String)> = Vec::new();
        for (claim, header) in &j.forward_claims {
            if claim.trim().is_empty() {
                self.error(
                    header.span(),
                    format!("`forward_claims` names the claim {claim:?}: no token has a claim by that name, so {:?} would never be set", header.get_ref()),
                );
            }
            self.header_name(header, "forward_claims", true);
            self.not_an_identity_header(
                header,
                "forward_claims",
                &cx.f.tenancy,
                &cx.tenancy.read_by,
            );
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
            issuer: j.issuer.as_ref().map(|s| s.get_ref().clone()),
            audience: j.audience.as_ref().map(|s| s.get_ref().clone()),
            forward_claims,
        }
    }
}
