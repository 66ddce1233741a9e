//! `bulkhead check` warnings for configurations that are valid but risk one tenant's
//! traffic reaching another's backend (exit 0, or 1 with `--strict`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::config::{Config, HostPattern, SourceKind};

/// Logs what `bulkhead check` warns about in `config`, one `warn` line each: at start
/// and after each reload that applies it, for the operator who did not run `check`.
pub fn log_warnings(config: &Config, path: &Path) {
    for w in &config.warnings {
        tracing::warn!(
            "{}:{}:{}: warning: {}",
            path.display(),
            w.line,
            w.col,
            w.message
        );
    }
    for w in isolation_warnings(config) {
        tracing::warn!("{}: warning: {w}", path.display());
    }
}

/// Every isolation risk in `config`, one human sentence each, naming the tenants.
pub fn isolation_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();

    // Tenants sharing an upstream cannot be told apart by the backend without the
    // forwarded tenant header.
    if config.forward_header.is_empty() {
        let mut by_upstream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for t in &config.tenants {
            let mut ups = vec![t.upstream.as_str()];
            ups.extend(t.routes.iter().map(|(_, u)| u.as_str()));
            ups.sort_unstable();
            ups.dedup();
            for u in ups {
                by_upstream.entry(u).or_default().push(&t.id);
            }
        }
        for (u, tenants) in by_upstream.iter().filter(|(_, t)| t.len() > 1) {
            out.push(format!(
                "tenants {} share upstream {u:?} while `tenancy.forward_header` is disabled: the backend cannot tell their requests apart",
                list(tenants)
            ));
        }
    }

    // A client-chosen header decides the tenant before anything it must prove.
    let credential = |s: &SourceKind| matches!(s, SourceKind::ApiKey | SourceKind::Jwt);
    if config.resolve.first() == Some(&SourceKind::Header) && !config.resolve.iter().any(credential)
    {
        out.push(
            "the \"header\" source comes first in `tenancy.resolve` and there is no credential source (\"api_key\" or \"jwt\"): any client can name any tenant by sending the header".to_owned(),
        );
    }

    // A wildcard that also covers another tenant's exact host: one typo in that host and
    // its traffic goes to the wildcard's owner. The wildcards by domain, then each exact
    // host looked up once (a scan of every pair took seconds at 20,000 tenants).
    let mut wildcards: HashMap<&str, Vec<(usize, &HostPattern)>> = HashMap::new();
    for (i, owner) in config.tenants.iter().enumerate() {
        for w in &owner.hosts {
            if let HostPattern::Wildcard(domain) = w {
                wildcards.entry(domain.as_str()).or_default().push((i, w));
            }
        }
    }
    let mut covered = Vec::new();
    for (j, other) in config.tenants.iter().enumerate() {
        for h in &other.hosts {
            let HostPattern::Exact(h) = h else { continue };
            let Some((label, rest)) = h.split_once('.') else {
                continue;
            };
            if label.is_empty() {
                continue;
            }
            for &(i, w) in wildcards.get(rest).into_iter().flatten() {
                if config.tenants[i].id != other.id {
                    covered.push((i, j, w, h));
                }
            }
        }
    }
    // In the order of the wildcards' owners, as the file lists them.
    covered.sort_by_key(|&(i, j, ..)| (i, j));
    for (i, j, w, h) in covered {
        out.push(format!(
            "the wildcard \"{w}\" of tenant {:?} also covers host {h:?} of tenant {:?}",
            config.tenants[i].id, config.tenants[j].id
        ));
    }

    // A wildcard on a single label (`*.com`) takes every name directly under a
    // top-level domain: every site a client names there (`globex.com`, `acme.io`) lands
    // on this one tenant. Almost always `*.acme.com` was meant. Only the one-label rule:
    // telling `*.co.uk` (a public suffix) from `*.acme.com` takes the public-suffix
    // list, which changes monthly and is not shipped. The names reserved for local and
    // test use (RFC 6761, 6762; ICANN's `internal`) are no one else's sites.
    const PRIVATE_USE: [&str; 6] = [
        "localhost",
        "test",
        "example",
        "invalid",
        "local",
        "internal",
    ];
    for t in &config.tenants {
        for w in &t.hosts {
            if let HostPattern::Wildcard(domain) = w {
                if !domain.contains('.') && !PRIVATE_USE.contains(&domain.as_str()) {
                    out.push(format!(
                        "the wildcard \"{w}\" of tenant {:?} covers every name under the top-level domain {domain:?} (any \"NAME.{domain}\" a client sends goes to this tenant): write the tenant's own domain, e.g. \"*.{}.{domain}\"",
                        t.id, t.id
                    ));
                }
            }
        }
    }

    // Some tenants demand credentials, others can be reached by host alone.
    let (with, without): (Vec<&str>, Vec<&str>) = {
        let mut with = Vec::new();
        let mut without = Vec::new();
        for t in &config.tenants {
            if t.require.is_empty() {
                without.push(t.id.as_str());
            } else {
                with.push(t.id.as_str());
            }
        }
        (with, without)
    };
    if !with.is_empty() && !without.is_empty() {
        out.push(format!(
            "tenants {} have no `require` while {} do: their traffic is accepted without a credential",
            list(&without),
            list(&with)
        ));
    }

    // An upstream whose certificate is not checked can be impersonated.
    for u in config.upstreams.iter().filter(|u| u.insecure) {
        out.push(format!(
            "upstream {:?} has `tls_insecure_skip_verify = true`: its certificate is not verified, so anyone on the network path can impersonate it",
            u.name
        ));
    }
    out
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
