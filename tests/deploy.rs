//! The deployment stack (Dockerfile, docker-compose.yml, deploy/), checked without
//! Docker: every file the stack mounts exists and lands where the services read it,
//! Prometheus' files pass `promtool` (config, rules and the rules' unit tests), the
//! Grafana dashboard and the alerts name only metrics that Bulkhead exports, and the
//! stack's gateway.toml passes `bulkhead check`.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The series names a live gateway exports at `/metrics` after traffic that touches
/// every family (a proxied 200, an upstream error, a rate-limited request, an unknown
/// host), read once from the real binary. A histogram appears as its `_bucket`, `_sum`
/// and `_count` series.
fn exported_series() -> BTreeSet<String> {
    static NAMES: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    NAMES.get_or_init(live_metric_names).clone()
}

fn http_get(addr: std::net::SocketAddr, host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn live_metric_names() -> BTreeSet<String> {
    // A tiny upstream that answers every request with 200.
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in up.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    let dead_guard = support::Refused::new();
    let dead = dead_guard.addr();
    let gw = support::Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.up]\ntargets = [\"{up_addr}\"]\n[upstreams.dead]\ntargets = [\"{dead}\"]\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"up\"\n[tenants.t.limits]\nrequests_per_second = 1\nburst = 2\nmax_in_flight = 10\nmax_body = 1000\nrequests_per_day = 1000\n\
         [[tenants.t.routes]]\nprefix = \"/dead\"\nupstream = \"dead\"\n\
         [cluster]\nredis = \"redis://127.0.0.1:1/0\"\n"
    ));
    assert!(http_get(gw.addr, "t.com", "/").starts_with("HTTP/1.1 200"));
    assert!(http_get(gw.addr, "t.com", "/dead").starts_with("HTTP/1.1 502"));
    assert!(http_get(gw.addr, "t.com", "/").starts_with("HTTP/1.1 429"));
    assert!(http_get(gw.addr, "nobody.com", "/").starts_with("HTTP/1.1 404"));
    let text = http_get(gw.admin, "admin", "/metrics");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let names: BTreeSet<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    // Every family of SPEC.md's table is there, so the check below is not vacuous.
    for family in [
        "bulkhead_requests_total",
        "bulkhead_request_duration_seconds_bucket",
        "bulkhead_rejected_total",
        "bulkhead_in_flight",
        "bulkhead_request_body_bytes_total",
        "bulkhead_response_body_bytes_total",
        "bulkhead_upstream_errors_total",
        "bulkhead_tenant_limit",
        "bulkhead_tenant_info",
        "bulkhead_config_reloads_total",
        "bulkhead_config_last_reload_success_timestamp_seconds",
        "bulkhead_config_info",
        "bulkhead_quota_used",
        "bulkhead_quota_limit",
        "bulkhead_store_errors_total",
    ] {
        assert!(names.contains(family), "/metrics lacks {family}:\n{body}");
    }
    names
}

// ---------------------------------------------------------------- files

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid JSON: {e}"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} should be a string, is {v}"))
}

// ---------------------------------------------------------------- docker-compose.yml

/// A bind mount of one compose service: a path in the repository, seen at `target`.
#[derive(Debug)]
struct Mount {
    host: PathBuf,
    target: String,
}

struct Compose {
    doc: Value,
    /// Bind mounts per service.
    mounts: BTreeMap<String, Vec<Mount>>,
    /// Every path in the repository the file refers to, with where it was named.
    referenced: Vec<(String, PathBuf)>,
}

fn is_host_path(s: &str) -> bool {
    s.starts_with('.') || s.starts_with('/') || s.starts_with('~')
}

fn compose() -> Compose {
    let doc = yaml("docker-compose.yml");
    let services = doc["services"]
        .as_object()
        .expect("docker-compose.yml has a `services` map");
    let named_volumes: BTreeSet<String> = doc["volumes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut mounts = BTreeMap::new();
    let mut referenced = Vec::new();
    for (name, svc) in services {
        // build: "dir" or { context: dir, dockerfile: file relative to the context }
        match &svc["build"] {
            Value::Null => {}
            Value::String(ctx) => {
                referenced.push((format!("{name}: build"), root().join(ctx)));
                referenced.push((
                    format!("{name}: build (Dockerfile)"),
                    root().join(ctx).join("Dockerfile"),
                ));
            }
            build => {
                let ctx = build["context"].as_str().unwrap_or(".");
                referenced.push((format!("{name}: build.context"), root().join(ctx)));
                let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
                referenced.push((
                    format!("{name}: build.dockerfile"),
                    root().join(ctx).join(dockerfile),
                ));
            }
        }
        // env_file: "file" or ["file", ...]
        match &svc["env_file"] {
            Value::String(f) => referenced.push((format!("{name}: env_file"), root().join(f))),
            Value::Array(files) => {
                for f in files {
                    let f = f["path"].as_str().or(f.as_str()).expect("env_file entry");
                    referenced.push((format!("{name}: env_file"), root().join(f)));
                }
            }
            _ => {}
        }
        // volumes: "source:target[:mode]" or { type, source, target }
        let mut svc_mounts = Vec::new();
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let (kind, source, target) = match v {
                Value::String(s) => {
                    let mut parts = s.splitn(3, ':');
                    let source = parts.next().unwrap_or_default().to_owned();
                    let Some(target) = parts.next() else {
                        continue; // an anonymous volume: nothing on the host
                    };
                    let kind = if is_host_path(&source) {
                        "bind"
                    } else {
                        "volume"
                    };
                    (kind.to_owned(), source, target.to_owned())
                }
                m => (
                    str_of(&m["type"], "volume type").to_owned(),
                    m["source"].as_str().unwrap_or_default().to_owned(),
                    str_of(&m["target"], "volume target").to_owned(),
                ),
            };
            match kind.as_str() {
                "bind" => {
                    let host = root().join(source.trim_start_matches("./"));
                    referenced.push((format!("{name}: volume {source}:{target}"), host.clone()));
                    svc_mounts.push(Mount { host, target });
                }
                "volume" if !source.is_empty() => assert!(
                    named_volumes.contains(&source),
                    "{name}: named volume {source:?} is not declared under top-level `volumes`"
                ),
                _ => {}
            }
        }
        mounts.insert(name.clone(), svc_mounts);
    }
    // Top-level configs and secrets may name files too.
    for section in ["configs", "secrets"] {
        for (name, c) in doc[section].as_object().into_iter().flatten() {
            if let Some(f) = c["file"].as_str() {
                referenced.push((format!("{section}.{name}"), root().join(f)));
            }
        }
    }
    Compose {
        doc,
        mounts,
        referenced,
    }
}

impl Compose {
    fn service(&self, name: &str) -> &Value {
        let svc = &self.doc["services"][name];
        assert!(
            svc.is_object(),
            "docker-compose.yml has no service {name:?}"
        );
        svc
    }

    fn has_service(&self, name: &str) -> bool {
        self.doc["services"][name].is_object()
    }

    /// The repository path that `service` sees at `container_path`, through the
    /// most specific of its bind mounts.
    fn host_path(&self, service: &str, container_path: &str) -> PathBuf {
        let best = self.mounts[service]
            .iter()
            .filter_map(|m| {
                let t = m.target.trim_end_matches('/');
                let rest = container_path.strip_prefix(t)?;
                (rest.is_empty() || rest.starts_with('/')).then_some((t.len(), m, rest))
            })
            .max_by_key(|(len, _, _)| *len);
        let Some((_, mount, rest)) = best else {
            panic!("service {service:?} mounts nothing at {container_path:?}");
        };
        match rest.trim_start_matches('/') {
            "" => mount.host.clone(),
            rest => mount.host.join(rest),
        }
    }

    /// The service's command as a list of arguments (`command:` in the file).
    fn command(&self, service: &str) -> Vec<String> {
        match &self.service(service)["command"] {
            Value::Array(args) => args
                .iter()
                .map(|a| str_of(a, "command argument").to_owned())
                .collect(),
            Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[test]
fn compose_mounts_only_files_that_exist() {
    let c = compose();
    for svc in ["bulkhead", "prometheus", "grafana"] {
        c.service(svc);
    }
    let binds: usize = c.mounts.values().map(Vec::len).sum();
    assert!(
        binds >= 5,
        "expected the stack's bind mounts, found {binds}"
    );
    let missing: Vec<String> = c
        .referenced
        .iter()
        .filter(|(_, p)| !p.exists())
        .map(|(what, p)| format!("{what}: {} does not exist", p.display()))
        .collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    // Each bind mount is of the same kind (file or directory) as what the image
    // expects at its target: a file target has an extension, a directory none.
    for (svc, mounts) in &c.mounts {
        for m in mounts {
            let looks_like_file = Path::new(&m.target).extension().is_some();
            assert_eq!(
                m.host.is_file(),
                looks_like_file,
                "{svc}: {} mounted at {}: a file should be mounted on a file path, a directory on a directory",
                m.host.display(),
                m.target
            );
        }
    }
}

// ---------------------------------------------------------------- Dockerfile

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (instr, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((instr.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

/// A `.dockerignore` pattern against a slash-separated path: `*` matches within one
/// segment, `**` across segments; a pattern that matches a parent excludes the path.
fn ignored(patterns: &[String], path: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', b'/', rest @ ..] => {
                (0..=s.len()).any(|i| (i == 0 || s[i - 1] == b'/') && glob(rest, &s[i..]))
            }
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| glob(rest, &s[i..])),
            [b'*', rest @ ..] => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| glob(rest, &s[i..])),
            [c, rest @ ..] => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }
    let segments: Vec<&str> = path.split('/').collect();
    let mut excluded = false;
    for pattern in patterns {
        let (negated, pat) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let pat = pat.trim_matches('/');
        let hit =
            (1..=segments.len()).any(|n| glob(pat.as_bytes(), segments[..n].join("/").as_bytes()));
        if hit {
            excluded = !negated;
        }
    }
    excluded
}

#[test]
fn dockerfile_builds_from_the_lockfile_and_runs_as_non_root() {
    let instrs = dockerfile();
    let froms: Vec<&str> = instrs
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        froms.len() >= 2 && froms[0].starts_with("rust:") && froms[0].contains(" AS "),
        "a multi-stage build from a rust image: {froms:?}"
    );
    let last_stage = instrs
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("a FROM");
    let run = instrs
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        run.contains("cargo build --release --locked"),
        "the binary is built from Cargo.lock: {run}"
    );
    let user = instrs[last_stage..]
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.as_str())
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid != "root" && uid != "0",
        "the final stage runs as root: USER {user}"
    );
    let exposed: BTreeSet<&str> = instrs
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .collect();
    assert!(
        exposed.contains("8080") && exposed.contains("9901"),
        "EXPOSE 8080 9901: {exposed:?}"
    );
    let exec_form = |name: &str| -> Vec<String> {
        let (_, args) = instrs
            .iter()
            .rev()
            .find(|(i, _)| i == name)
            .unwrap_or_else(|| panic!("the Dockerfile has no {name}"));
        serde_json::from_str(args).unwrap_or_else(|e| panic!("{name} in exec form: {args}: {e}"))
    };
    assert_eq!(exec_form("ENTRYPOINT"), ["bulkhead"]);
    assert_eq!(
        exec_form("CMD"),
        ["run", "--config", "/etc/bulkhead/gateway.toml"]
    );

    // What the build copies from the context exists and is not in .dockerignore.
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let mut needed = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "src/main.rs".to_owned(),
        "src/lib.rs".to_owned(),
    ];
    for (i, args) in &instrs {
        if (i == "COPY" || i == "ADD") && !args.contains("--from=") {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            for src in &words[..words.len().saturating_sub(1)] {
                if *src != "." {
                    needed.push(src.trim_start_matches("./").to_owned());
                }
            }
        }
    }
    for path in &needed {
        assert!(
            root().join(path).exists(),
            "the build copies {path}, which does not exist"
        );
        assert!(
            !ignored(&patterns, path),
            ".dockerignore excludes {path}, which the build needs"
        );
    }
    // The patterns do work: the target directory and the history stay out.
    assert!(ignored(&patterns, "target/debug/bulkhead") && ignored(&patterns, ".git/HEAD"));
}

#[test]
fn dockerignore_matching() {
    let p = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert!(ignored(&p(&["target/"]), "target/release/x"));
    assert!(!ignored(&p(&["target/"]), "src/target.rs"));
    assert!(ignored(
        &p(&["**/__pycache__/"]),
        "benches/load/__pycache__/a.pyc"
    ));
    assert!(ignored(&p(&["*.md"]), "README.md"));
    assert!(!ignored(&p(&["*.md"]), "docs/a.md"));
    assert!(!ignored(
        &p(&["deploy/", "!deploy/bulkhead"]),
        "deploy/bulkhead/gateway.toml"
    ));
}

// ---------------------------------------------------------------- bulkhead in the stack

#[test]
fn stack_gateway_config_passes_check() {
    let c = compose();
    // The config the container reads is deploy/bulkhead/gateway.toml.
    let cmd = match c.command("bulkhead") {
        args if !args.is_empty() => args,
        _ => vec![
            "run".into(),
            "--config".into(),
            "/etc/bulkhead/gateway.toml".into(),
        ],
    };
    let at = cmd
        .iter()
        .position(|a| a == "--config")
        .expect("bulkhead runs with --config");
    let host = c.host_path("bulkhead", &cmd[at + 1]);
    assert!(
        same_file(&host, &root().join("deploy/bulkhead/gateway.toml")),
        "the container reads {}, not deploy/bulkhead/gateway.toml",
        host.display()
    );

    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["check", "--config"])
        .arg(&host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bulkhead check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 tenants"), "{stdout}");

    // Reachable from the other containers, and its upstreams are compose services.
    let cfg: toml::Value = toml::from_str(&read("deploy/bulkhead/gateway.toml")).unwrap();
    for key in ["listen", "admin_listen"] {
        let addr: std::net::SocketAddr = cfg["server"][key].as_str().unwrap().parse().unwrap();
        assert!(
            addr.ip().is_unspecified(),
            "server.{key} = {addr}: inside a container it must listen on 0.0.0.0"
        );
    }
    let upstreams = cfg["upstreams"].as_table().unwrap();
    assert!(!upstreams.is_empty());
    for (name, u) in upstreams {
        for t in u["targets"].as_array().unwrap() {
            let t = t.as_str().unwrap().trim_start_matches("http://");
            let host = t.rsplit_once(':').unwrap().0;
            assert!(
                host.parse::<std::net::IpAddr>().is_ok() || c.has_service(host),
                "upstream {name}: target host {host:?} is not a compose service"
            );
        }
    }
}

// ---------------------------------------------------------------- Prometheus

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): it comes with Debian's `prometheus` package, \
                 which scripts/test.sh installs; run the tests through scripts/test.sh \
                 or `apt-get install prometheus`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_config_rules_and_rule_tests() {
    let (ok, out) = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(ok, "promtool check config:\n{out}");
    assert!(
        out.contains("1 rule files found"),
        "the config loads alerts.yml:\n{out}"
    );

    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");

    // The alerts fire on the series that should fire them, and only on those.
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    assert!(ok, "promtool test rules:\n{out}");
}

#[test]
fn prometheus_scrapes_the_gateway_admin_listener() {
    let c = compose();
    let config_arg = c
        .command("prometheus")
        .into_iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .unwrap_or_else(|| "/etc/prometheus/prometheus.yml".to_owned());
    let host = c.host_path("prometheus", &config_arg);
    assert!(
        same_file(&host, &root().join("deploy/prometheus/prometheus.yml")),
        "Prometheus reads {}, not deploy/prometheus/prometheus.yml",
        host.display()
    );
    let prom = yaml("deploy/prometheus/prometheus.yml");

    // rule_files are relative to the config file, in the container as here.
    let config_dir = Path::new(&config_arg).parent().unwrap();
    let rules: Vec<&Value> = prom["rule_files"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    assert!(!rules.is_empty(), "prometheus.yml loads the alert rules");
    for r in rules {
        let in_container = config_dir.join(str_of(r, "rule file"));
        let host = c.host_path("prometheus", in_container.to_str().unwrap());
        assert!(
            host.is_file(),
            "rule file {} is not mounted into the container",
            in_container.display()
        );
    }

    let job = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "bulkhead")
        .expect("a scrape job named bulkhead");
    assert_eq!(job["scrape_interval"], "5s");
    assert!(matches!(
        job["metrics_path"].as_str(),
        None | Some("/metrics")
    ));
    let cfg: toml::Value = toml::from_str(&read("deploy/bulkhead/gateway.toml")).unwrap();
    let admin_port = cfg["server"]["admin_listen"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_owned();
    // Every replica of the `bulkhead` service, through Docker's DNS.
    let sd = job["dns_sd_configs"]
        .as_array()
        .expect("the bulkhead job discovers the replicas with dns_sd_configs");
    assert_eq!(sd.len(), 1, "{sd:?}");
    assert_eq!(sd[0]["names"], serde_json::json!(["bulkhead"]));
    assert_eq!(sd[0]["type"], "A");
    assert_eq!(sd[0]["port"].to_string(), admin_port);
}

#[test]
fn haproxy_balances_tcp_over_the_gateway_replicas() {
    let c = compose();
    let replicas = c.service("bulkhead")["deploy"]["replicas"].as_u64();
    assert_eq!(replicas, Some(3), "three gateway replicas");
    assert!(c.has_service("redis"), "the replicas share a Redis");
    let cfg = c.host_path("haproxy", "/usr/local/etc/haproxy/haproxy.cfg");
    assert!(same_file(&cfg, &root().join("deploy/haproxy/haproxy.cfg")));
    let text = read("deploy/haproxy/haproxy.cfg");
    assert!(text.contains("mode tcp"), "an L4 balancer");
    assert!(
        text.contains("bulkhead:8080"),
        "it balances over the bulkhead service"
    );
    // The published data port is HAProxy's; the replicas publish only admin ports.
    let ports = |svc: &str| -> Vec<String> {
        c.service(svc)["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| str_of(p, "port").to_owned())
            .collect()
    };
    assert!(ports("haproxy").iter().any(|p| p.ends_with(":8080:8080")));
    assert!(ports("bulkhead").iter().all(|p| !p.ends_with(":8080")));
    // The stack's gateway config points at the compose service `redis`.
    let gw: toml::Value = toml::from_str(&read("deploy/bulkhead/gateway.toml")).unwrap();
    assert_eq!(
        gw["cluster"]["redis"].as_str(),
        Some("redis://redis:6379/0")
    );
    let out = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(root().join("deploy/haproxy/haproxy.cfg"))
        .output();
    match out {
        Ok(out) => assert!(
            out.status.success(),
            "haproxy -c:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "cannot run haproxy ({e}): scripts/test.sh installs Debian's haproxy package"
            );
            eprintln!("\n*** haproxy -c SKIPPED: haproxy is not installed ***\n");
        }
    }
}

// ---------------------------------------------------------------- Grafana

#[test]
fn grafana_provisioning_points_at_the_dashboard() {
    let c = compose();
    let ds_file = c.host_path(
        "grafana",
        "/etc/grafana/provisioning/datasources/prometheus.yml",
    );
    assert!(
        same_file(
            &ds_file,
            &root().join("deploy/grafana/provisioning/datasources/prometheus.yml")
        ),
        "{}",
        ds_file.display()
    );
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let ds = &ds["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    let url = str_of(&ds["url"], "datasource url");
    let ds_host = url.trim_start_matches("http://").split(':').next().unwrap();
    assert!(
        c.has_service(ds_host),
        "datasource url {url}: no service {ds_host:?}"
    );
    let uid = str_of(&ds["uid"], "datasource uid");

    let providers_file = c.host_path(
        "grafana",
        "/etc/grafana/provisioning/dashboards/dashboards.yml",
    );
    assert!(providers_file.is_file(), "{}", providers_file.display());
    let providers = yaml("deploy/grafana/provisioning/dashboards/dashboards.yml");
    let dash_dir = str_of(
        &providers["providers"][0]["options"]["path"],
        "provider path",
    );
    let host_dir = c.host_path("grafana", dash_dir);
    assert!(
        same_file(
            &host_dir.join("bulkhead.json"),
            &root().join("deploy/grafana/dashboards/bulkhead.json")
        ),
        "the provider reads {}, which should hold deploy/grafana/dashboards/bulkhead.json",
        host_dir.display()
    );

    // Every panel and query uses the provisioned datasource.
    let dash = json("deploy/grafana/dashboards/bulkhead.json");
    let mut checked = 0;
    for (title, p) in panels(&dash) {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], uid, "panel {title:?}");
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], uid, "panel {title:?}");
            checked += 1;
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            assert_eq!(v["datasource"]["uid"], uid, "variable {}", v["name"]);
        }
    }
    assert!(checked > 0);
}

/// Every panel, rows' nested panels included, with its title.
fn panels(dash: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("the dashboard has panels") {
        out.push((p["title"].as_str().unwrap_or_default().to_owned(), p));
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push((
                inner["title"].as_str().unwrap_or_default().to_owned(),
                inner,
            ));
        }
    }
    out
}

// ---------------------------------------------------------------- metric names

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names (in `{}`, `by ()`, `on ()`, ...), strings,
/// durations or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
    ];

    // Blank out strings, label matchers, ranges and variables.
    let chars: Vec<char> = expr.chars().collect();
    let mut cleaned = String::new();
    let mut i = 0;
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                skip_string(&mut i);
                cleaned.push(' ');
            }
            open @ ('{' | '[') => {
                let close = if open == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if matches!(chars[i], '"' | '\'' | '`') {
                        skip_string(&mut i);
                    } else {
                        i += 1;
                    }
                }
                i += 1;
                cleaned.push(' ');
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
                cleaned.push(' ');
            }
            c => {
                cleaned.push(c);
                i += 1;
            }
        }
    }

    // Tokens: identifiers, numbers (durations included) and single punctuation.
    let mut tokens: Vec<String> = Vec::new();
    let b: Vec<char> = cleaned.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.' || b[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == ':') {
                i += 1;
            }
            tokens.push(b[start..i].iter().collect());
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }

    let mut names = BTreeSet::new();
    let mut t = 0;
    while t < tokens.len() {
        let tok = tokens[t].as_str();
        let next = tokens.get(t + 1).map(String::as_str);
        if LABEL_LISTS.contains(&tok) {
            if next == Some("(") {
                while t < tokens.len() && tokens[t] != ")" {
                    t += 1;
                }
            }
        } else if tok.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && !AGGREGATIONS.contains(&tok)
            && !KEYWORDS.contains(&tok)
            && next != Some("(")
        {
            names.insert(tok.to_owned());
        }
        t += 1;
    }
    names
}

/// The metric names a Grafana template-variable query selects.
fn variable_query_metrics(query: &str) -> BTreeSet<String> {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        // label_values(selector, label) or label_values(label)
        return match args.rsplit_once(',') {
            Some((selector, _label)) => metric_names(selector),
            None => BTreeSet::new(),
        };
    }
    if let Some(expr) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return metric_names(expr);
    }
    metric_names(q)
}

#[test]
fn metric_name_extraction() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"sum by (tenant, status) (rate(bulkhead_requests_total{tenant=~"$tenant", status=~"5.."}[$__rate_interval]))"#
        ),
        ["bulkhead_requests_total"]
    );
    assert_eq!(
        names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m] offset 1h))) / on (tenant) group_left (status) up > 0.8"),
        ["up", "x_bucket"]
    );
    assert_eq!(
        names(r#"a{l="}"} and bool b unless count(c) * 1e3"#),
        ["a", "b", "c"]
    );
    assert_eq!(
        variable_query_metrics("label_values(bulkhead_tenant_info{status=\"active\"}, tenant)")
            .into_iter()
            .collect::<Vec<_>>(),
        ["bulkhead_tenant_info"]
    );
    assert!(variable_query_metrics("label_values(tenant)").is_empty());
}

fn assert_only_exported(source: &str, used: &BTreeMap<String, BTreeSet<String>>) {
    let exported = exported_series();
    let unknown: Vec<String> = used
        .iter()
        .flat_map(|(where_, names)| {
            names
                .iter()
                .filter(|n| !exported.contains(*n))
                .map(move |n| format!("{source}: {where_}: {n}"))
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics that Bulkhead does not export at /metrics:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn dashboard_names_only_exported_metrics() {
    let dash = json("deploy/grafana/dashboards/bulkhead.json");
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut titles = BTreeSet::new();
    for (title, p) in panels(&dash) {
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        let mut exprs = Vec::new();
        for t in &targets {
            let expr = str_of(&t["expr"], "target expr");
            assert!(!expr.trim().is_empty(), "panel {title:?}: empty query");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
            used.entry(format!("panel {title:?}"))
                .or_default()
                .extend(names);
            exprs.push(expr.to_owned());
        }
        titles.insert((title, exprs));
    }
    let variables = dash["templating"]["list"].as_array().expect("templating");
    let tenant_var = variables
        .iter()
        .find(|v| v["name"] == "tenant")
        .expect("a `tenant` template variable");
    for v in variables {
        if v["type"] != "query" {
            continue;
        }
        // `query` is a string, or an object holding it (Grafana 10+).
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .or(v["definition"].as_str())
            .expect("a variable query");
        used.entry(format!("variable {}", v["name"]))
            .or_default()
            .extend(variable_query_metrics(q));
    }
    let tenant_q = tenant_var["query"]["query"]
        .as_str()
        .or(tenant_var["query"].as_str())
        .unwrap();
    assert_eq!(tenant_q, "label_values(bulkhead_tenant_info, tenant)");

    assert_only_exported("deploy/grafana/dashboards/bulkhead.json", &used);

    // The per-tenant panels exist, follow the `tenant` variable, and use the metrics
    // they are about.
    let required = [
        ("Requests/s by status", "bulkhead_requests_total"),
        (
            "Latency p50 / p95 / p99",
            "bulkhead_request_duration_seconds_bucket",
        ),
        ("Rejections/s by reason", "bulkhead_rejected_total"),
        ("Rate limit utilisation", "bulkhead_tenant_limit"),
        ("In flight / max_in_flight", "bulkhead_in_flight"),
    ];
    for (title, metric) in required {
        let (_, exprs) = titles
            .iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        assert!(
            exprs.iter().any(|e| metric_names(e).contains(metric)),
            "panel {title:?} should use {metric}: {exprs:?}"
        );
        assert!(
            exprs.iter().all(|e| e.contains(r#"tenant=~"$tenant""#)),
            "panel {title:?} should follow the tenant variable: {exprs:?}"
        );
    }
    let latency = &titles
        .iter()
        .find(|(t, _)| t == "Latency p50 / p95 / p99")
        .unwrap()
        .1;
    for q in ["0.5", "0.95", "0.99"] {
        assert!(
            latency
                .iter()
                .any(|e| e.starts_with(&format!("histogram_quantile({q},"))),
            "latency panel lacks quantile {q}: {latency:?}"
        );
    }
    let utilisation = &titles
        .iter()
        .find(|(t, _)| t == "Rate limit utilisation")
        .unwrap()
        .1;
    assert!(
        utilisation
            .iter()
            .any(|e| e.contains("bulkhead_requests_total")
                && e.contains(r#"limit="requests_per_second""#)),
        "{utilisation:?}"
    );
}

#[test]
fn alerts_name_only_exported_metrics() {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("a rule name")
                .to_owned();
            let names = metric_names(str_of(&rule["expr"], "rule expr"));
            assert!(!names.is_empty(), "rule {name}: no metric");
            used.insert(format!("rule {name}"), names);
            alerts.insert(name);
        }
    }
    assert_only_exported("deploy/prometheus/alerts.yml", &used);
    for required in [
        "BulkheadTenantNearRateLimit",
        "BulkheadTenantHighErrorRatio",
        "BulkheadConfigReloadFailed",
        "BulkheadTenantQuota80",
        "BulkheadTenantQuota90",
        "BulkheadTenantQuotaExhausted",
        "BulkheadStoreErrors",
    ] {
        assert!(alerts.contains(required), "no alert {required}: {alerts:?}");
    }
}
