//! `[upstreams]`: names, targets and their scheme, the CA that verifies them; and
//! what every reference to an upstream needs of it.

use super::*;

/// `name` is an upstream a tenant, a route or `[defaults]` may name: defined, with
/// targets.
pub(super) fn upstream_ok(f: &FileConfig, name: &str) -> bool {
    f.upstreams
        .get(name)
        .is_some_and(|u| !u.targets.get_ref().is_empty())
}

impl Validator<'_> {
    /// `tls_files` gets the CA bundles the upstreams name.
    pub(super) fn upstreams(
        &mut self,
        path: &Path,
        f: &FileConfig,
        tls_files: &mut Vec<PathBuf>,
    ) -> Vec<ResolvedUpstream> {
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
                match crate::tls::load_ca(raw, base, tls_files, "upstream") {
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
        upstreams
    }

    pub(super) fn missing_upstream(&mut self, u: &Spanned<String>, who: &str) {
        self.error(
            u.span(),
            format!(
                "{who} names upstream {:?}, which is not defined in [upstreams] or has no targets",
                u.get_ref()
            ),
        );
    }
}
