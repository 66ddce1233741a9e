//! `[tenancy]`: the sources that name a request's tenant, the headers they read and
//! the one the gateway sets, the path prefix, and the issuer-wide JWT keys.

use super::*;

/// A `tenancy.jwt.leeway` above this is a warning.
const MAX_SENSIBLE_LEEWAY: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// `[tenancy]`, validated as far as the tenants need it.
pub(super) struct Tenancy<'f> {
    /// `[tenancy.jwt] jwks_file`'s keys, with `issuer` and `audience`.
    pub(super) jwt_global: Option<crate::jwt::ResolvedJwt>,
    /// The header each credential source in `resolve` reads, and its key.
    pub(super) read_by: Vec<(&'f Spanned<String>, &'static str)>,
}

impl Validator<'_> {
    /// `base`: the config file's directory, that relative key files are read from.
    pub(super) fn tenancy<'f>(
        &mut self,
        t: &'f TenancyConfig,
        base: &Path,
        tls_listen: Option<SocketAddr>,
    ) -> Tenancy<'f> {
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
        // Leeway is for clocks that disagree by seconds; past a few minutes it keeps
        // expired tokens working (at most ten years: every duration's bound).
        let leeway = t.jwt.leeway.get_ref().0;
        if leeway > MAX_SENSIBLE_LEEWAY {
            self.warn(
                t.jwt.leeway.span(),
                format!("`tenancy.jwt.leeway` of {}: a token is still accepted that long after it expired (and that long before its nbf); leeway covers clock skew, seconds to a minute", humantime::format_duration(leeway)),
            );
        }
        for (v, key) in [(&t.jwt.issuer, "issuer"), (&t.jwt.audience, "audience")] {
            self.not_blank_claim(v.as_ref(), &format!("tenancy.jwt.{key}"));
        }
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
        let mut read_by: Vec<(&Spanned<String>, &'static str)> = Vec::new();
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
        self.unread_settings(t);
        Tenancy {
            jwt_global,
            read_by,
        }
    }

    /// An `issuer` or `audience` is required of every token when set: an empty one
    /// passes only a token whose `iss` / `aud` is "", so in practice none.
    pub(super) fn not_blank_claim(&mut self, v: Option<&Spanned<String>>, key: &str) {
        if let Some(v) = v.filter(|v| v.get_ref().trim().is_empty()) {
            let claim = if key.ends_with("issuer") {
                "iss"
            } else {
                "aud"
            };
            self.error(
                v.span(),
                format!("`{key}` must not be empty: a token would need an empty `{claim}` claim to verify (leave the key out not to check `{claim}`)"),
            );
        }
    }

    /// A setting of a source `tenancy.resolve` does not name is read by nothing: most
    /// likely the source was meant to be added. A warning, at each key the file sets.
    fn unread_settings(&mut self, t: &TenancyConfig) {
        let jwt = &t.jwt;
        let settings = [
            (SourceKind::Header, Some(&t.header), "tenancy.header"),
            (
                SourceKind::Path,
                Some(&t.path_prefix),
                "tenancy.path_prefix",
            ),
            (
                SourceKind::ApiKey,
                Some(&t.api_key.header),
                "tenancy.api_key.header",
            ),
            (SourceKind::Jwt, Some(&jwt.header), "tenancy.jwt.header"),
            (SourceKind::Jwt, jwt.cookie.as_ref(), "tenancy.jwt.cookie"),
            (
                SourceKind::Jwt,
                Some(&jwt.tenant_claim),
                "tenancy.jwt.tenant_claim",
            ),
            (
                SourceKind::Jwt,
                jwt.jwks_file.as_ref(),
                "tenancy.jwt.jwks_file",
            ),
        ];
        for (source, value, key) in settings {
            // A default has no position: only what the file sets.
            let Some(v) = value.filter(|v| !v.span().is_empty()) else {
                continue;
            };
            if !t.resolve.get_ref().contains(&source) {
                self.warn(
                    v.span(),
                    format!(
                        "`{key}` is set but `tenancy.resolve` has no {:?} source: nothing reads it (add {:?} to `tenancy.resolve`, or leave the key out)",
                        source.name(),
                        source.name()
                    ),
                );
            }
        }
    }
}
