//! `bulkhead check`: exit codes and `PATH:LINE:COL: message` lines.

mod support;

use std::process::Command;

fn check(text: &str) -> (i32, String, String) {
    support::run_check(text, &[])
}

const BASE: &str =
    "[upstreams.shared]\ntargets = [\"127.0.0.1:9001\"]\n[defaults]\nupstream = \"shared\"\n";

#[test]
fn shipped_config_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok") && stdout.contains("3 tenants"),
        "{stdout}"
    );
}

#[test]
fn a_duration_past_ten_years_is_refused_with_its_position() {
    // Accepted before, then the first request added it to the clock and the process
    // aborted.
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.acme]\nhosts = [\"a.com\"]\nrequest_timeout = \"300000000000y\"\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.trim()
            .starts_with("PATH:7:19: invalid duration \"300000000000y\": longer than ten years"),
        "{err}"
    );
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.acme]\nhosts = [\"a.com\"]\nrequest_timeout = \"3650d\"\n"
    ));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn zero_timeouts_and_a_runaway_worker_count_are_refused_with_their_positions() {
    // All accepted before: `workers = 100000` aborted the process at start (a worker
    // thread's event loop could not be built), a zero `request_timeout` answered 504 to
    // some requests and 200 to others, a zero `header_read_timeout` served on.
    let bad = format!(
        "[server]\nworkers = 100000\nheader_read_timeout = \"0s\"\n{BASE}request_timeout = \"0s\"\n\
         [tenants.acme]\nhosts = [\"a.com\"]\nrequest_timeout = \"0ms\"\n"
    );
    let (code, _, err) = check(&bad);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "PATH:2:11: `server.workers` must be at most 1024 (0 = one per core)",
            "PATH:3:23: `server.header_read_timeout` must be positive",
            "PATH:8:19: `request_timeout` must be positive",
            "PATH:11:19: `request_timeout` must be positive",
        ],
        "{err}"
    );
    let good = bad
        .replace("100000", "1024")
        .replace("\"0s\"", "\"1ms\"")
        .replace("\"0ms\"", "\"1ms\"");
    let (code, _, err) = check(&good);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_worker_that_cannot_start_is_an_error_not_a_crash() {
    // 1,024 workers with 64 file descriptors: the event loops cannot all be built. The
    // process must stop with a message and exit code 1, not panic in a worker thread.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 1024\n{BASE}\
             [tenants.acme]\nhosts = [\"a.com\"]\n"
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .args([
            "30",
            "sh",
            "-c",
            "ulimit -n 64 && exec \"$0\" run --no-watch --config \"$1\"",
        ])
        .arg(env!("CARGO_BIN_EXE_bulkhead"))
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("cannot start worker") && err.contains("of 1024: Too many open files"),
        "{err}"
    );
}

#[test]
fn header_names_the_gateway_needs_for_itself_are_refused() {
    // A tenant header of `content-length` was stripped from requests (their bodies then
    // read as the next request upstream), a forwarded header of `transfer-encoding`
    // answered every request 501, one of `x-forwarded-for` replaced the client address.
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"header\", \"host\"]\nheader = \"Content-Length\"\n\
         forward_header = \"transfer-encoding\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "PATH:3:10: `tenancy.header` cannot be \"Content-Length\": the gateway reads and writes it for every request itself",
            "PATH:4:18: `tenancy.forward_header` cannot be \"transfer-encoding\": the gateway reads and writes it for every request itself",
        ],
        "{err}"
    );
    for (key, name, why) in [
        (
            "forward_header",
            "x-forwarded-for",
            "the gateway sets it on forwarded requests itself",
        ),
        (
            "forward_header",
            "host",
            "the gateway reads and writes it for every request itself",
        ),
        (
            "forward_header",
            "connection",
            "it is hop-by-hop: removed at the gateway",
        ),
    ] {
        let (code, _, err) = check(&format!(
            "[tenancy]\n{key} = \"{name}\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
        ));
        assert_eq!(code, 1, "{key} = {name}");
        assert_eq!(
            err.trim(),
            format!(
                "PATH:2:{}: `tenancy.{key}` cannot be {name:?}: {why}",
                key.len() + 4
            )
        );
    }
    // A header the gateway only reads may be one it also sets for the backend, or a
    // hop-by-hop one (read before those are removed).
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"header\", \"host\"]\nheader = \"x-request-id\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check(&format!(
        "[tenancy]\napi_key.header = \"proxy-authorization\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_state_dir_that_is_a_file_and_an_audit_log_that_is_a_directory_are_refused() {
    // Both were accepted: the quota counters then failed to save every second, and the
    // audit log lost every line, each with only a warning.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (f, d) = (file.display(), dir.path().display());
    let (code, _, err) = check(&format!(
        "[server]\nstate_dir = \"{f}\"\naudit_log = \"{d}\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            format!("PATH:2:13: `server.state_dir` \"{f}\" exists and is not a directory"),
            format!("PATH:3:13: `server.audit_log` \"{d}\" is a directory; name a file in it"),
        ],
        "{err}"
    );
    // A directory that does not exist yet is made; a new audit log file is created.
    let (code, _, err) = check(&format!(
        "[server]\nstate_dir = \"{d}/new\"\naudit_log = \"{d}/audit.jsonl\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 0, "{err}");
}

/// `check` reports every problem at once: a `server.listen` or `admin_listen` that is
/// no address hid the problems of `server.audit_log` (an empty path, a directory),
/// which then came one fix later.
#[test]
fn a_bad_listener_does_not_hide_the_audit_logs_problems() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    for (listener, audit, says) in [
        (
            "listen = \"nope\"",
            String::new(),
            "`server.audit_log` must be a file path (leave it out to turn the audit log off)"
                .to_owned(),
        ),
        (
            "admin_listen = \"127.0.0.1\"",
            d.to_string(),
            format!("`server.audit_log` \"{d}\" is a directory; name a file in it"),
        ),
    ] {
        let (code, _, err) = check(&format!(
            "[server]\n{listener}\naudit_log = \"{audit}\"\n{BASE}"
        ));
        assert_eq!(code, 1, "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(lines[0].starts_with("PATH:2:"), "{err}");
        assert_eq!(lines[1], format!("PATH:3:13: {says}"), "{err}");
    }
}

/// `audit_log` naming the config file itself was accepted: the gateway appended its
/// startup audit line to its own config, whose next reload (or start) then failed.
#[test]
fn an_audit_log_that_is_the_config_file_is_refused() {
    let (code, _, err) = check(&format!(
        "[server]\naudit_log = \"gateway.toml\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "PATH:2:13: `server.audit_log` \"gateway.toml\" is this configuration file; name another file",
    );
    let (code, _, err) = check(&format!(
        "[server]\naudit_log = \"./gateway.toml\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = check(&format!(
        "[server]\naudit_log = \"audit.jsonl\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn unknown_key() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.acme]\nhosts = [\"a.com\"]\nupstreem = \"x\"\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.trim().starts_with(
            "PATH:7:1: unknown field `upstreem`, expected one of `hosts`, `upstream`, `request_timeout`,"
        ),
        "{err}"
    );
}

#[test]
fn duplicate_host_across_tenants() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.globex]\nhosts = [\"b.com\", \"A.com\"]\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "PATH:8:19: host \"a.com\" of tenant \"globex\" already belongs to tenant \"acme\": a host belongs to at most one tenant"
    );
}

#[test]
fn route_naming_a_missing_upstream() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[[tenants.acme.routes]]\nprefix = \"/r\"\nupstream = \"reports\"\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "PATH:9:12: a route of tenant \"acme\" names upstream \"reports\", which is not defined in [upstreams] or has no targets"
    );
}

#[test]
fn bad_tenant_id() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.\"Acme Corp\"]\nhosts = [\"a.com\"]\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "PATH:5:10: tenant id \"Acme Corp\" must match [a-z0-9][a-z0-9_-]{0,62}"
    );
}

#[test]
fn several_problems_are_all_reported() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.Bad]\nhosts = [\"x.com\"]\n[tenants.ok]\nhosts = [\"x.com\"]\nupstream = \"nope\"\n[defaults.limits]\nburst = 0\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 4, "{err}");
    assert!(err.lines().all(|l| l.starts_with("PATH:")), "{err}");
}

/// Deserializing stops at the first wrong type or unknown key; each tenant, upstream
/// and other table is read on its own too, so one of each is reported (only the first
/// was). A syntax error is still reported alone.
#[test]
fn type_errors_in_separate_parts_are_all_reported() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.a]\nhosts = [\"a.com\"]\nstatus = 1\n[tenants.b]\nhostz = [\"b.com\"]\n\
         [upstreams.x]\ntargets = 5\n[server]\nworkers = \"two\"\n\
         [tenants.c]\nhosts = [\"c.com\"]\n[[tenants.c.routes]]\nprefix = 1\n[tenants.ok]\nhosts = [\"ok.com\"]\n"
    ));
    assert_eq!(code, 1);
    let want = [
        "PATH:7:10: invalid type: `1`, expected a string (one of the names this key takes)",
        "PATH:9:1: unknown field `hostz`, expected one of `hosts`,",
        "PATH:11:11: invalid type: integer `5`, expected a sequence",
        "PATH:13:11: invalid type: string \"two\", expected a whole number, 0 or more",
        "PATH:17:10: invalid type: integer `1`, expected a string",
    ];
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), want.len(), "{err}");
    for (line, want) in lines.iter().zip(want) {
        assert!(line.starts_with(want), "want {want:?}, got:\n{err}");
    }
    // A syntax error stops the parse: reported alone, the type error after it not.
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.a]\nhosts = [\"a.com\"\nstatus = 1\n[tenants.b]\nstatus = 1\n"
    ));
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("PATH:7:1: missing comma between array elements"),
        "{err}"
    );
}

#[test]
fn missing_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["check", "--config", "/nonexistent/gateway.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("/nonexistent/gateway.toml:1:1: cannot read the file"));
}

#[test]
fn run_with_invalid_file_fails_fast_with_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "[server]\nlisten = \"nope\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.toml:2:10: `server.listen` must be an IP address and port"),
        "{err}"
    );
}

fn check_args(text: &str, strict: bool) -> (i32, String) {
    let (code, _, stderr) = support::run_check(text, if strict { &["--strict"] } else { &[] });
    (code, stderr)
}

/// Each isolation lint: a warning naming the tenants, exit 0; exit 1 with --strict.
#[test]
fn isolation_lints_name_the_tenants() {
    let key = |k: &str| bulkhead::credentials::hash_key(k.as_bytes());
    let cases = [
        (
            format!("[tenancy]\nforward_header = \"\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.globex]\nhosts = [\"g.com\"]\n"),
            "tenants \"acme\", \"globex\" share upstream \"shared\" while `tenancy.forward_header` is disabled",
        ),
        (
            format!("[tenancy]\nresolve = [\"header\", \"host\"]\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"),
            "the \"header\" source comes first in `tenancy.resolve` and there is no credential source",
        ),
        (
            format!("{BASE}[tenants.acme]\nhosts = [\"*.example.com\"]\n[tenants.globex]\nhosts = [\"globex.example.com\"]\n"),
            "the wildcard \"*.example.com\" of tenant \"acme\" also covers host \"globex.example.com\" of tenant \"globex\"",
        ),
        (
            format!(
                "[tenancy]\nresolve = [\"api_key\", \"host\"]\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\napi_keys = [\"{}\"]\nrequire = [\"api_key\"]\n[tenants.globex]\nhosts = [\"g.com\"]\n",
                key("k")
            ),
            "tenants \"globex\" have no `require` while \"acme\" do",
        ),
        (
            format!("{BASE}[tenants.acme]\nhosts = [\"acme.com\", \"*.COM.\"]\n"),
            "the wildcard \"*.com\" of tenant \"acme\" covers every name under the top-level domain \"com\" (any \"NAME.com\" a client sends goes to this tenant): write the tenant's own domain, e.g. \"*.acme.com\"",
        ),
    ];
    for (text, expected) in &cases {
        let (code, err) = check_args(text, false);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains(&format!("PATH: warning: {expected}")),
            "{expected}\n---\n{err}"
        );
        let (code, err) = check_args(text, true);
        assert_eq!(code, 1, "--strict fails on: {err}");
        assert!(err.contains("failing because of --strict"), "{err}");
    }
    // A config with none of these risks passes --strict: a wildcard under the
    // tenant's own domain, and one under a name reserved for local use.
    let (code, err) = check_args(
        &format!("{BASE}[tenants.acme]\nhosts = [\"a.com\", \"*.acme.com\", \"*.localhost\"]\n"),
        true,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}

/// `[defaults.limits] burst` with the rates set per tenant is accepted; a tenant that
/// sets no rate ends up with the burst alone, which limits nothing: a warning at the
/// burst naming the tenants (exit 0; 1 with --strict). Accepted silently before.
#[test]
fn a_default_burst_that_a_tenant_has_without_a_rate_is_a_warning() {
    let text = format!(
        "{BASE}[defaults.limits]\nburst = 50\nper_client_burst = 5\n\
         [tenants.metered]\nhosts = [\"m.com\"]\n\
         [tenants.metered.limits]\nrequests_per_second = 10\nper_client_requests_per_second = 1\n\
         [tenants.free]\nhosts = [\"f.com\"]\n\
         [tenants.own]\nhosts = [\"o.com\"]\n\
         [tenants.own.limits]\nrequests_per_second = 10\nburst = 20\n"
    );
    let (code, err) = check_args(&text, false);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "PATH:6:9: warning: [defaults.limits] burst limits nothing for tenant \"free\": it has no `requests_per_second` (of its own or in [defaults.limits]), and a burst only sizes the bucket of that rate",
            "PATH:7:20: warning: [defaults.limits] per_client_burst limits nothing for tenants \"free\", \"own\": none of them has a `per_client_requests_per_second` (of its own or in [defaults.limits]), and a per_client_burst only sizes the bucket of that rate",
        ],
        "{err}"
    );
    let (code, err) = check_args(&text, true);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.ends_with("PATH: 2 warning(s); failing because of --strict\n"),
        "{err}"
    );
    // Every tenant has a rate for the burst it takes: no warning, --strict passes.
    for rates in [
        "requests_per_second = 1\nper_client_requests_per_second = 1\n",
        "",
    ] {
        let text = format!(
            "{BASE}[defaults.limits]\nburst = 50\n{rates}\
             [tenants.metered]\nhosts = [\"m.com\"]\n\
             [tenants.metered.limits]\nrequests_per_second = 10\n\
             [tenants.own]\nhosts = [\"o.com\"]\n\
             [tenants.own.limits]\nrequests_per_second = 10\nburst = 20\n"
        );
        let (code, err) = check_args(&text, true);
        assert_eq!(code, 0, "{rates}: {err}");
        assert!(!err.contains("warning"), "{err}");
    }
}

/// Settings that were accepted silently and do nothing: a `[tenancy]` key of a source
/// `resolve` does not name, a tenant no source can name (only ever 404), a daily quota
/// above the monthly one. Each a warning at its key (exit 0; 1 with --strict).
#[test]
fn settings_that_nothing_reads_are_warnings_at_their_keys() {
    let cases = [
        (
            format!("[tenancy]\nheader = \"x-customer\"\npath_prefix = \"/c/\"\n{BASE}"),
            vec![
                "PATH:2:10: warning: `tenancy.header` is set but `tenancy.resolve` has no \"header\" source: nothing reads it (add \"header\" to `tenancy.resolve`, or leave the key out)",
                "PATH:3:15: warning: `tenancy.path_prefix` is set but `tenancy.resolve` has no \"path\" source: nothing reads it (add \"path\" to `tenancy.resolve`, or leave the key out)",
            ],
        ),
        (
            format!("[tenancy.api_key]\nheader = \"x-key\"\n[tenancy.jwt]\ncookie = \"session\"\n{BASE}"),
            vec![
                "PATH:2:10: warning: `tenancy.api_key.header` is set but `tenancy.resolve` has no \"api_key\" source: nothing reads it (add \"api_key\" to `tenancy.resolve`, or leave the key out)",
                "PATH:4:10: warning: `tenancy.jwt.cookie` is set but `tenancy.resolve` has no \"jwt\" source: nothing reads it (add \"jwt\" to `tenancy.resolve`, or leave the key out)",
            ],
        ),
        (
            format!("[tenancy]\nresolve = [\"host\", \"api_key\"]\n{BASE}[tenants.staged]\nstatus = \"active\"\n[tenants.live]\nhosts = [\"l.com\"]\n"),
            vec![
                "PATH:7:10: warning: tenant \"staged\" can be named by no source in `tenancy.resolve` (\"host\": it has no `hosts`; \"api_key\": it has no `api_keys`): every request meant for it is 404 `unknown_tenant`",
            ],
        ),
        (
            format!("{BASE}[defaults.limits]\nrequests_per_day = 2000\nrequests_per_month = 1000\n\
                     [tenants.a]\nhosts = [\"a.com\"]\n\
                     [tenants.b]\nhosts = [\"b.com\"]\n[tenants.b.limits]\nrequests_per_month = 50000\n\
                     [tenants.c]\nhosts = [\"c.com\"]\n[tenants.c.limits]\nrequests_per_month = 100\n"),
            vec![
                "PATH:6:20: warning: [defaults.limits] `requests_per_day` (2000) is more than `requests_per_month` (1000): the monthly quota runs out first, so the daily one never applies",
                "PATH:17:22: warning: [tenants.c.limits] `requests_per_day` (2000) is more than `requests_per_month` (100): the monthly quota runs out first, so the daily one never applies",
            ],
        ),
    ];
    for (text, expected) in &cases {
        let (code, err) = check_args(text, false);
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(&lines, expected, "{err}");
        let (code, err) = check_args(text, true);
        assert_eq!(code, 1, "{err}");
    }
    // What each source reads, with the source: no warning.
    let key = bulkhead::credentials::hash_key(b"k");
    let (code, err) = check_args(
        &format!(
            "[tenancy]\nresolve = [\"host\", \"header\", \"api_key\"]\nheader = \"x-customer\"\n\
             [tenancy.api_key]\nheader = \"x-key\"\n{BASE}\
             [tenants.keyed]\napi_keys = [\"{key}\"]\nrequire = [\"api_key\"]\n\
             [tenants.keyed.limits]\nrequests_per_day = 10\nrequests_per_month = 300\n"
        ),
        true,
    );
    assert_eq!((code, err.as_str()), (0, ""), "{err}");
}

/// `trusted_proxies = ["0.0.0.0/0"]` was accepted silently: every client's
/// `x-forwarded-for` is then believed, and a client dodges its per-client limit by
/// naming another address in it. A warning at the entry where a per-client rate is set.
#[test]
fn trusting_every_address_as_a_proxy_is_a_warning_with_per_client_limits() {
    let text = |proxies: &str, limits: &str| {
        format!("[server]\ntrusted_proxies = {proxies}\n{BASE}[tenants.a]\nhosts = [\"a.com\"]\n[tenants.a.limits]\n{limits}")
    };
    let per_client = "per_client_requests_per_second = 5\n";
    let (code, err) = check_args(
        &text("[\"10.0.0.0/8\", \"0.0.0.0/0\", \" ::/0\"]", per_client),
        false,
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "PATH:2:34: warning: `server.trusted_proxies` entry \"0.0.0.0/0\" trusts every IPv4 address: the `x-forwarded-for` of any IPv4 client is believed, so it names the address its per-client limit counts against (list the proxies' own addresses)",
            "PATH:2:47: warning: `server.trusted_proxies` entry \"::/0\" trusts every IPv6 address: the `x-forwarded-for` of any IPv6 client is believed, so it names the address its per-client limit counts against (list the proxies' own addresses)",
        ],
        "{err}"
    );
    // The proxies' own addresses, or no per-client rate to key: no warning.
    for (proxies, limits) in [
        ("[\"10.0.0.0/8\", \"fd00::/8\"]", per_client),
        ("[\"0.0.0.0/0\"]", "requests_per_second = 5\n"),
    ] {
        let (code, err) = check_args(&text(proxies, limits), true);
        assert_eq!((code, err.as_str()), (0, ""), "{proxies}: {err}");
    }
}

#[test]
fn jwt_settings_that_would_verify_nothing_or_anything_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let rsa_private = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jwt/globex-rs256-private.pem"
    ))
    .unwrap();
    let short = file("short.key", "supersecret\r\n");
    let long_crlf = file("long.key", "0123456789abcdef0123456789abcdef\r\n");
    let private = file("private.pem", &rsa_private);
    let empty_oct = file(
        "oct.json",
        r#"{"keys":[{"kty":"oct","k":"","alg":"HS256","kid":"k1"}]}"#,
    );
    let jwt = "[tenancy]\nresolve = [\"jwt\", \"host\"]\n";
    let jwks = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jwt/globex-jwks.json"
    );
    let cases: Vec<(String, &str)> = vec![
        // An HMAC key anyone can guess: tokens for the tenant can be forged.
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{short}\"\n"),
            "is 11 bytes; an HS256 secret needs at least 32",
        ),
        (
            format!("{jwt}[tenancy.jwt]\njwks_file = \"{empty_oct}\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"),
            "the HMAC key at index 0 (kid \"k1\") is 0 bytes",
        ),
        // A private key where the public one goes: no token would ever verify.
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\npublic_keys = [\"{private}\"]\n"),
            "is a private key; `public_keys` takes public keys",
        ),
        // Settings that would silently check nothing.
        (
            format!("{jwt}[tenancy.jwt]\nissuer = \"https://idp/\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\n"),
            "PATH:4:10: `tenancy.jwt.issuer` applies to the issuer-wide keys of `tenancy.jwt.jwks_file`, which is not set",
        ),
        (
            format!("{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\n"),
            "tenant \"acme\" has `[tenants.acme.jwt]` keys but `tenancy.resolve` has no \"jwt\" source",
        ),
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nissuer = \"x\"\n"),
            "`[tenants.acme.jwt]` has no keys",
        ),
        // Two sources reading one header: every API key would be read as a token.
        (
            format!("[tenancy]\nresolve = [\"jwt\", \"api_key\", \"host\"]\n[tenancy.jwt]\nheader = \"X-Api-Key\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\n"),
            "PATH:4:10: `tenancy.jwt.header` and `tenancy.api_key.header` are both \"X-Api-Key\"",
        ),
        // A claim in the header that names the tenant for the backend.
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\nforward_claims = {{ sub = \"X-Tenant-Id\" }}\n"),
            "`forward_claims` cannot be \"X-Tenant-Id\": it is `tenancy.forward_header`, which names the tenant",
        ),
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\nforward_claims = {{ sub = \"x-user\", email = \"X-User\" }}\n"),
            "`forward_claims` sends claims \"email\" and \"sub\" both in \"x-user\"",
        ),
        // An empty issuer, audience or claim name: accepted before, and then no token
        // carried the empty `iss` / `aud` it required, or the claim to forward.
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\nissuer = \"\"\n"),
            "PATH:11:10: `[tenants.acme.jwt] issuer` must not be empty: a token would need an empty `iss` claim to verify (leave the key out not to check `iss`)",
        ),
        (
            format!("{jwt}[tenancy.jwt]\njwks_file = \"{jwks}\"\naudience = \" \"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"),
            "PATH:5:12: `tenancy.jwt.audience` must not be empty: a token would need an empty `aud` claim to verify (leave the key out not to check `aud`)",
        ),
        (
            format!("{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\nforward_claims = {{ \"\" = \"x-user\" }}\n"),
            "PATH:11:25: `forward_claims` names the claim \"\": no token has a claim by that name, so \"x-user\" would never be set",
        ),
    ];
    assert_refused(&cases, true);
    // A secret file's CRLF line ending is not part of the secret (32 bytes here), and
    // a well-formed setup passes.
    let (code, _, err) = check(&format!(
        "{jwt}{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"{long_crlf}\"\nforward_claims = {{ sub = \"x-user\" }}\n"
    ));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn cluster_settings_that_could_never_work_or_would_change_nothing_are_refused() {
    let scoped = "[defaults.limits]\nscope = \"cluster\"\nrequests_per_second = 10\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("[cluster]\nredis = \"redis://127.0.0.1:0\"\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n"),
            "PATH:2:9: `cluster.redis`: \"redis://127.0.0.1:0\" names port 0, where no Redis can listen",
        ),
        (
            format!("[cluster]\nredis = \"redis://127.0.0.1:6379/-1\"\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n"),
            "names database -1; databases are numbered from 0",
        ),
        (
            format!("[cluster]\nredis = [\"redis://10.0.0.1:6379\", \"rediss://10.0.0.2:6379\"]\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n"),
            "`cluster.redis` mixes redis:// and rediss:// nodes",
        ),
        (
            format!("[cluster]\nredis = 5\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n"),
            "PATH:2:9: `cluster.redis` must be a redis:// (or rediss://) URL, or a list of them",
        ),
        (
            format!("[cluster]\nredis = \"redis://127.0.0.1:6379\"\ninstance_id = \"   \"\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n"),
            "PATH:3:15: `cluster.instance_id` must be 1 to 128 characters, not all spaces",
        ),
        // on_store_failure on limits that never ask the store: it would change nothing.
        (
            format!("{BASE}[tenants.a]\nhosts = [\"a.com\"]\n[tenants.a.limits]\non_store_failure = \"closed\"\n"),
            "[tenants.a.limits] on_store_failure applies to scope = \"cluster\" limits, and this tenant's are local",
        ),
        (
            format!("{BASE}[defaults.limits]\non_store_failure = \"closed\"\n[tenants.a]\nhosts = [\"a.com\"]\n"),
            "[defaults.limits] on_store_failure applies to scope = \"cluster\" limits, and no table has them",
        ),
    ];
    assert_refused(&cases, false);
    // 100 characters of two bytes each are 100 characters; the defaults' policy for
    // the tenants that opt into cluster scope is fine.
    let id = "é".repeat(100);
    let (code, _, err) = check(&format!(
        "[cluster]\nredis = \"redis://127.0.0.1:6379\"\ninstance_id = \"{id}\"\n{BASE}[defaults.limits]\non_store_failure = \"closed\"\n[tenants.a]\nhosts = [\"a.com\"]\n[tenants.a.limits]\nscope = \"cluster\"\nrequests_per_second = 10\n[tenants.b]\nhosts = [\"b.com\"]\n"
    ));
    assert_eq!(code, 0, "{err}");
}

/// A `cluster.redis` URL the client could not use is refused in our words at the key
/// (redis-rs said "Redis URL did not parse" for most of these), the password hidden.
#[test]
fn bad_redis_urls_are_refused_in_plain_words() {
    let scoped = "[defaults.limits]\nscope = \"cluster\"\nrequests_per_second = 10\n";
    let conf = |redis: &str| {
        format!("[cluster]\nredis = {redis}\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n")
    };
    let cases: Vec<(String, &str)> = vec![
        (
            conf("\"redis://127.0.0.1:99999/0\""),
            "PATH:2:9: `cluster.redis`: \"redis://127.0.0.1:99999/0\": the port must be a number from 1 to 65535 (6379 when left out), not \"99999\"",
        ),
        (
            conf("\"redis://127.0.0.1:6a79\""),
            "PATH:2:9: `cluster.redis`: \"redis://127.0.0.1:6a79\": the port must be a number from 1 to 65535 (6379 when left out), not \"6a79\"",
        ),
        (
            conf("\"redis://user:s3cret@10.0.0.1:70000\""),
            "PATH:2:9: `cluster.redis`: \"redis://***@10.0.0.1:70000\": the port must be a number from 1 to 65535",
        ),
        (
            conf("\"redis://:6379/0\""),
            "PATH:2:9: `cluster.redis`: \"redis://:6379/0\" names no host: write redis://HOST[:PORT][/DB]",
        ),
        (
            conf("\"redis://:pa/ss@10.0.0.1:6379\""),
            "PATH:2:9: `cluster.redis`: \"redis://***@10.0.0.1:6379\" names no host: a '/', '?' or '#' in the user or password must be percent-encoded",
        ),
        (
            conf("\"http://127.0.0.1:6379\""),
            "PATH:2:9: `cluster.redis`: \"http://127.0.0.1:6379\": the scheme must be redis:// or rediss:// (TLS)",
        ),
        (
            conf("\"127.0.0.1:6379\""),
            "PATH:2:9: `cluster.redis`: \"127.0.0.1:6379\" is not a URL: write redis://HOST[:PORT][/DB] (rediss:// for TLS)",
        ),
        (
            conf("\"redis://redis_1..internal:6379\""),
            "PATH:2:9: `cluster.redis`: \"redis://redis_1..internal:6379\": \"redis_1..internal\" is not a valid host name",
        ),
        (
            conf("\"redis://0.0.0.0:6379\""),
            "PATH:2:9: `cluster.redis`: \"redis://0.0.0.0:6379\" names the wildcard address 0.0.0.0",
        ),
        (
            conf("\"redis://[::1:6379\""),
            "PATH:2:9: `cluster.redis`: \"redis://[::1:6379\": an IPv6 address is closed by ']'",
        ),
        (
            conf("\"redis://127.0.0.1:6379/zero\""),
            "PATH:2:9: `cluster.redis`: \"redis://127.0.0.1:6379/zero\": the path names the database, a number such as /0, not \"/zero\"",
        ),
        (
            conf("\"rediss://127.0.0.1:6379/#unsafe\""),
            "PATH:2:9: `cluster.redis`: \"rediss://127.0.0.1:6379/#unsafe\": the one fragment a rediss:// URL takes is #insecure",
        ),
        (
            conf("[\"redis://10.0.0.1:6379\", \"unix:///run/redis.sock\"]"),
            "PATH:2:9: `cluster.redis`: \"unix:///run/redis.sock\": the nodes of a Redis Cluster are reached over TCP",
        ),
        (
            conf("\"unix://\""),
            "PATH:2:9: `cluster.redis`: \"unix://\" names no socket: write unix:///PATH/TO/redis.sock",
        ),
    ];
    assert_refused(&cases, true);
    for (text, _) in &cases[2..=4] {
        let (_, _, err) = check(text);
        assert!(!err.contains("s3cret") && !err.contains("pa/ss"), "{err}");
    }
    for ok in [
        "\"redis://redis:6379\"",
        "\"REDIS://Redis.Internal.:6379/15\"",
        "\"rediss://10.0.0.1\"",
        "\"rediss://10.0.0.1:6380/#insecure\"",
        "\"redis://[::1]:6379/2\"",
        "\"redis://[::1]\"",
        "\"redis://:p%2Fw@127.0.0.1:6379/0\"",
        "\"redis://default:pw@127.0.0.1/0?protocol=resp3\"",
        "\"valkey://127.0.0.1:6379\"",
        "\"unix:///run/redis/redis.sock\"",
        "\"redis+unix:///run/redis/redis.sock?db=1\"",
        "[\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]",
    ] {
        let (code, _, err) = check(&conf(ok));
        assert_eq!(code, 0, "{ok}: {err}");
    }
}

/// A bad port in `cluster.redis` (too large, not a number, 0) gets our words naming
/// the key and the URL, its password masked, from `check` and at start alike (not the
/// client's "Redis URL did not parse").
#[test]
fn a_bad_redis_port_is_refused_in_our_words_by_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    for (url, says) in [
        ("redis://u:hunter2@h:99999", "\"redis://***@h:99999\": the port must be a number from 1 to 65535 (6379 when left out), not \"99999\""),
        ("redis://:hunter2@h:abc/0", "\"redis://***@h:abc/0\": the port must be a number from 1 to 65535 (6379 when left out), not \"abc\""),
        ("redis://h:0", "\"redis://h:0\" names port 0, where no Redis can listen"),
    ] {
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[cluster]\nredis = \"{url}\"\n{BASE}"),
        )
        .unwrap();
        let expected = format!("{}:5:9: `cluster.redis`: {says}", path.display());
        for cmd in ["check", "run"] {
            let (code, err) = bulkhead_within(&[cmd.as_ref(), "--config".as_ref(), path.as_os_str()]);
            assert_eq!(code, 1, "{cmd} {url}: {err}");
            assert_eq!(err.trim(), expected, "{cmd} {url}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}

/// The seed nodes of a Redis Cluster are all reached with the first seed's user,
/// password and protocol (redis-rs's cluster client has one set for every node, the
/// ones the cluster announces included), and a Redis Cluster has only database 0. A
/// list that differed passed `check`: the client refused it at connect time, or, when
/// the first seed had no password, dropped the others' and Redis answered NOAUTH; a
/// database other than 0 failed every connection (SELECT is refused in cluster mode).
/// Now each is refused at the key, the passwords hidden.
#[test]
fn redis_cluster_seeds_that_differ_in_credentials_or_name_a_database_are_refused() {
    let scoped = "[defaults.limits]\nscope = \"cluster\"\nrequests_per_second = 10\n";
    let conf = |redis: &str| {
        format!("[cluster]\nredis = {redis}\n{BASE}{scoped}[tenants.a]\nhosts = [\"a.com\"]\n")
    };
    let same = "; the client reaches every node of a Redis Cluster (the seeds and the nodes the cluster announces) with one user, password and protocol, the first seed's, so the seeds name the same";
    let cases: Vec<(String, String)> = vec![
        (
            conf("[\"redis://10.0.0.1:7000\", \"redis://:s3cret@10.0.0.2:7000\"]"),
            format!("PATH:2:9: `cluster.redis`: \"redis://***@10.0.0.2:7000\" differs from \"redis://10.0.0.1:7000\" in its password{same}"),
        ),
        (
            conf("[\"redis://:s3cret@10.0.0.1:7000\", \"redis://:0ther@10.0.0.2:7000\"]"),
            format!("PATH:2:9: `cluster.redis`: \"redis://***@10.0.0.2:7000\" differs from \"redis://***@10.0.0.1:7000\" in its password{same}"),
        ),
        (
            conf("[\"redis://app:s3cret@10.0.0.1:7000\", \"redis://ops:s3cret@10.0.0.2:7000?protocol=resp3\"]"),
            format!("PATH:2:9: `cluster.redis`: \"redis://***@10.0.0.2:7000?protocol=resp3\" differs from \"redis://***@10.0.0.1:7000\" in its user and protocol (?protocol=){same}"),
        ),
        (
            conf("[\"redis://:s3cret@10.0.0.1:7000/2\", \"redis://:s3cret@10.0.0.2:7000/0\"]"),
            "PATH:2:9: `cluster.redis`: a Redis Cluster has only database 0 (it refuses SELECT of another), so its seed nodes name /0 or no database, not \"redis://***@10.0.0.1:7000/2\" (database 2)".to_owned(),
        ),
    ];
    for (text, want) in &cases {
        let (code, _, err) = check(text);
        assert_eq!(code, 1, "{want}\n{text}");
        assert_eq!(err.trim_end(), want, "{text}");
        assert!(!err.contains("s3cret") && !err.contains("0ther"), "{err}");
    }
    // The same credentials written differently (percent-encoded), database 0 said or
    // not: one cluster. One URL is a single server, whose database may be any.
    for ok in [
        "[\"redis://app:s3cret@10.0.0.1:7000/0\", \"redis://app:s3cr%65t@10.0.0.2:7000\"]",
        "\"redis://app:s3cret@10.0.0.1:7000/2\"",
    ] {
        let (code, _, err) = check(&conf(ok));
        assert_eq!(code, 0, "{ok}: {err}");
    }
}

/// Each config is refused, its message containing the text given with it (and, when
/// `alone`, the only problem found).
fn assert_refused(cases: &[(String, &str)], alone: bool) {
    for (text, want) in cases {
        let (code, _, err) = check(text);
        assert_eq!(code, 1, "{want}\n{text}");
        assert!(
            err.contains(want),
            "want {want:?}, got:\n{err}\n---\n{text}"
        );
        if alone {
            assert_eq!(err.lines().count(), 1, "one problem each:\n{err}");
        }
    }
}

/// A byte that is not UTF-8 is reported where it is, by `check` and at start, as a
/// reload reports it (it was `1:1` wherever it was).
#[test]
fn invalid_utf8_is_reported_at_the_first_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, b"[server]\nworkers = 1 # caf\xe9\n").unwrap();
    for cmd in ["check", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args([cmd, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("gateway.toml:2:18: the file is not valid UTF-8"),
            "{cmd}: {err}"
        );
    }
}

/// A tenant whose one route has `prefix` (a TOML value, quotes included) on line 8, col 10.
fn with_route(prefix: &str) -> String {
    format!(
        "{BASE}[tenants.a]\nhosts = [\"a.com\"]\n[[tenants.a.routes]]\nprefix = {prefix}\nupstream = \"shared\"\n"
    )
}

/// Routes match the path without its query, after normalisation (`route_path`): a
/// prefix that no normalised path can start with, or a second route with the same
/// prefix, is a route no request ever takes. All were accepted before.
#[test]
fn route_prefixes_that_can_never_match_are_refused_at_the_prefix() {
    let never = "PATH:8:10: route prefix";
    let cases: Vec<(String, &str)> = vec![
        (with_route("\"/r?x=1\""), "PATH:8:10: route prefix \"/r?x=1\" of tenant \"a\" can never match: routes match the path without its query string ('?' starts it)"),
        (with_route("\"/r#x\""), "PATH:8:10: route prefix \"/r#x\" of tenant \"a\" can never match: a fragment ('#') is never sent in a request"),
        (with_route("\"/r x\""), "PATH:8:10: route prefix \"/r x\" of tenant \"a\" can never match: ' ' is not valid in a request path (percent-encode it: %20)"),
        (with_route("\"/r\\tx\""), "can never match: '\\t' is not valid in a request path (percent-encode it: %09)"),
        (with_route("\"/<r>\""), "can never match: '<' is not valid in a request path (percent-encode it: %3C)"),
        (with_route("\"//r\""), "PATH:8:10: route prefix \"//r\" of tenant \"a\" can never match: paths are normalised before routes match them (repeated '/' merged, '.' and '..' segments resolved, %XX of unreserved characters decoded); write \"/r\""),
        (with_route("\"/r/../s\""), "write \"/s\""),
        (with_route("\"/r/./s\""), "write \"/r/s\""),
        (with_route("\"/r/.\""), "write \"/r/\""),
        (with_route("\"/%72\""), "write \"/r\""),
        (with_route("\"/a%2db\""), "write \"/a-b\""),
        (
            format!("{BASE}[upstreams.v]\ntargets = [\"127.0.0.1:9002\"]\n[tenants.a]\nhosts = [\"a.com\"]\n[[tenants.a.routes]]\nprefix = \"/r\"\nupstream = \"v\"\n[[tenants.a.routes]]\nprefix = \"/r\"\nupstream = \"shared\"\n"),
            "PATH:13:10: route prefix \"/r\" of tenant \"a\" is also the prefix of an earlier route (line 10), which takes every request it matches: this route would never be used",
        ),
        (
            format!("{BASE}[upstreams.v]\ntargets = [\"127.0.0.1:9002\"]\n[tenants.a]\nhosts = [\"a.com\"]\n[[tenants.a.routes]]\nprefix = \"/a%2fb\"\nupstream = \"v\"\n[[tenants.a.routes]]\nprefix = \"/a%2Fb\"\nupstream = \"shared\"\n"),
            "PATH:13:10: route prefix \"/a%2Fb\" of tenant \"a\" is also the prefix of an earlier route (line 10)",
        ),
        (
            format!("[tenancy]\nresolve = [\"path\"]\npath_prefix = \"/t?/\"\n{BASE}"),
            "PATH:3:15: `tenancy.path_prefix` \"/t?/\" can never match: the \"path\" source reads the path without its query string ('?' starts it)",
        ),
        (
            format!("[tenancy]\nresolve = [\"path\"]\npath_prefix = \"/t t/\"\n{BASE}"),
            "PATH:3:15: `tenancy.path_prefix` \"/t t/\" can never match: ' ' is not valid in a request path (percent-encode it: %20)",
        ),
    ];
    assert_refused(&cases, true);
    assert!(cases.iter().take(3).all(|(_, w)| w.starts_with(never)));
    // What a normalised path can start with stays accepted: encoded reserved bytes,
    // the bytes clients send unencoded, a trailing '/', dots inside a segment.
    for ok in [
        "\"/r%20x\"",
        "\"/a%2Fb\"",
        "\"/a%2fb\"",
        "\"/{x}\"",
        "\"/r/\"",
        "\"/\"",
        "\"/.well-known\"",
        "\"/a..b/c.\"",
        "\"/caf\u{e9}\"",
    ] {
        let (code, _, err) = check(&with_route(ok));
        assert_eq!(code, 0, "{ok}: {err}");
    }
    // As before: no leading '/', or empty.
    for bad in ["\"r\"", "\"\""] {
        let (code, _, err) = check(&with_route(bad));
        assert_eq!(code, 1, "{bad}");
        assert!(
            err.contains("PATH:8:10:") && err.contains("must start with '/'"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Two tenants may each route "/r"; "/r" and "/r/" are different routes.
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.a]\nhosts = [\"a.com\"]\n[[tenants.a.routes]]\nprefix = \"/r\"\nupstream = \"shared\"\n[[tenants.a.routes]]\nprefix = \"/r/\"\nupstream = \"shared\"\n\
         [tenants.b]\nhosts = [\"b.com\"]\n[[tenants.b.routes]]\nprefix = \"/r\"\nupstream = \"shared\"\n"
    ));
    assert_eq!(code, 0, "{err}");
}

/// These were reported at `1:1`, wherever they were.
#[test]
fn server_settings_are_refused_at_their_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            format!("[server]\nworkers = 1\nmax_header_bytes = 512\n{BASE}"),
            "PATH:3:20: `server.max_header_bytes` must be at least 1KiB",
        ),
        (
            format!("[server]\nworkers = 1\nmax_header_bytes = \"100GiB\"\n{BASE}"),
            "PATH:3:20: `server.max_header_bytes` must be at most 8MiB, not 107374182400 bytes: every connection may hold a head this large",
        ),
        (
            format!("[server]\nworkers = 1\nlimiter_prune_interval = \"0s\"\n{BASE}"),
            "PATH:3:26: `server.limiter_prune_interval` must be positive",
        ),
        (
            format!("[server]\nworkers = 1\nredirect_http = true\n{BASE}"),
            "PATH:3:17: `server.redirect_http = true` needs `server.tls_listen`",
        ),
    ];
    assert_refused(&cases, true);
}

/// A tenant with one host (a TOML string, quotes included) on line 6, col 10.
fn with_host(host: &str) -> String {
    format!("{BASE}[tenants.a]\nhosts = [{host}]\n")
}

#[test]
fn hosts_and_targets_that_are_no_name_address_or_port_are_refused() {
    let cases: Vec<(String, &str)> = vec![
        (with_host("\"256.1.1.1\""), "PATH:6:10: tenant \"a\": host \"256.1.1.1\" is not a valid IPv4 address, and a host name cannot end in an all-digit label"),
        (with_host("\"1.2.3\""), "PATH:6:10: tenant \"a\": host \"1.2.3\" is not a valid IPv4 address, and a host name cannot end in an all-digit label"),
        (with_host("\"*.1.2\""), "host \"*.1.2\" cannot be a wildcard: a host name cannot end in an all-digit label"),
        (with_host("\"*.10.0.0.1\""), "host \"*.10.0.0.1\" cannot be a wildcard: a host name cannot end in an all-digit label"),
        (with_host("\"-a.com\""), "PATH:6:10: tenant \"a\": host \"-a.com\": label \"-a\" starts or ends with '-'"),
        (with_host("\"a-.com\""), "label \"a-\" starts or ends with '-'"),
        (with_host("\"127.0.0.1.\""), "PATH:6:10: tenant \"a\": host \"127.0.0.1.\": an IP address takes no trailing dot"),
        (with_host("\"http://a.com\""), "PATH:6:10: tenant \"a\": host \"http://a.com\" is a URL; write the host name alone: \"a.com\""),
        (with_host("\"::1\""), "PATH:6:10: tenant \"a\": host \"::1\": IPv6 literals are not supported in `hosts`"),
        (with_host("\"caf\u{e9}.com\""), "must be ASCII: write an internationalised name in its punycode form (xn--...)"),
        (BASE.replace("127.0.0.1:9001", "a:+80"), "PATH:2:12: target \"a:+80\": the port must be a number from 1 to 65535"),
        (BASE.replace("127.0.0.1:9001", "127.0.0.1:99999"), "PATH:2:12: target \"127.0.0.1:99999\": the port must be a number from 1 to 65535"),
        (BASE.replace("127.0.0.1:9001", "http://a:"), "PATH:2:12: target \"http://a:\" must name a port"),
    ];
    assert_refused(&cases, true);
    for ok in [
        "\"a_b.internal\"",
        "\"_srv.a.com\"",
        "\"xn--bcher-kva.example\"",
        "\"10.0.0.1\"",
        "\"a.com.\"",
        "\"*.a-b.com\"",
        "\"3com.com\"",
        "\"a.b1\"",
        "\"localhost\"",
    ] {
        let (code, _, err) = check(&with_host(ok));
        assert_eq!(code, 0, "{ok}: {err}");
    }
    for ok in [
        "a_b:80",
        "https://a.com",
        "[::1]:9001",
        "http://a.com:65535/",
    ] {
        let (code, _, err) = check(&BASE.replace("127.0.0.1:9001", ok));
        assert_eq!(code, 0, "{ok}: {err}");
    }
}

/// Messages in the operator's words: no Rust type names, the duplicate key named, no
/// duration parser internals, one line per problem.
#[test]
fn messages_name_the_problem_in_the_files_terms() {
    let t = "[tenants.a]\nhosts = [\"a.com\"]\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("[server]\nworkers = -1\n{BASE}"), "PATH:2:11: invalid value: integer `-1`, expected a whole number, 0 or more"),
        (format!("{BASE}[defaults.limits]\nburst = -1\n"), "PATH:6:9: invalid value: integer `-1`, expected a whole number, 0 or more"),
        (format!("{BASE}[defaults.limits]\nmax_in_flight = 99999999999999999999\n"), "PATH:6:17: integer `99999999999999999999` is too large"),
        (format!("{BASE}{t}status = 1\n"), "PATH:7:10: invalid type: `1`, expected a string (one of the names this key takes)"),
        (format!("{BASE}{t}hosts = [\"b.com\"]\n"), "PATH:7:1: duplicate key `hosts`: a key or table is set twice"),
        (format!("{BASE}{t}[tenants.a]\nupstream = \"shared\"\n"), "PATH:7:10: duplicate key `a`: a key or table is set twice"),
        (format!("{BASE}request_timeout = \"-1s\"\n"), "PATH:5:19: invalid duration \"-1s\": expected a number and a unit, e.g. \"250ms\", \"30s\", \"5m\""),
        (format!("{BASE}request_timeout = \"30S\"\n"), "PATH:5:19: invalid duration \"30S\": unknown unit \"S\" (use ms, s, m, h or d, in lower case), e.g. \"250ms\", \"30s\", \"5m\""),
        (format!("[tenancy]\nresolve = [\"host\", \"host\"]\n{BASE}"), "PATH:2:11: `tenancy.resolve` names \"host\" twice"),
    ];
    assert_refused(&cases, true);
    let (code, _, err) = check(&format!("{BASE}{t}require = [\"api_key\", \"api_key\"]\n"));
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// An upstream's `ca` verifies the upstream's certificate: it is no client CA.
#[test]
fn an_upstream_ca_is_called_the_upstream_ca() {
    let (code, _, err) = check(&format!(
        "{BASE}[upstreams.x]\ntargets = [\"https://a.com\"]\nca = \"missing.pem\"\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:7:6: upstream \"x\": cannot read the upstream CA bundle"),
        "{err}"
    );
}

/// The options of a bare `bulkhead` (run) before a subcommand are an error, not
/// silently dropped: `bulkhead --config F check` checked ./gateway.toml and passed.
#[test]
fn run_options_before_a_subcommand_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[tenants.Bad]\nhosts = [\"x\"]\n").unwrap();
    for args in [
        vec!["--config", bad.to_str().unwrap(), "check"],
        vec!["--demo", "check", "--config", bad.to_str().unwrap()],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args(&args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("cannot be used with"), "{args:?}: {err}");
    }
}

/// Listeners that would take the same port are refused at the key the file sets: a
/// wildcard covers a specific address (`run` then failed with "Address already in
/// use" after `check` passed), and a `listen` on the default admin port is reported
/// at `listen`, not at `1:1`.
#[test]
fn listeners_sharing_a_port_are_refused() {
    let (code, _, err) = check(&format!(
        "[server]\nlisten = \"0.0.0.0:18480\"\nadmin_listen = \"127.0.0.1:18480\"\n{BASE}"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PATH:3:16: `server.admin_listen` (127.0.0.1:18480) must not share its port"),
        "{err}"
    );
    let (code, _, err) = check(&format!("[server]\nlisten = \"127.0.0.1:9901\"\n{BASE}"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PATH:2:10: `server.listen` (127.0.0.1:9901) takes the port of `server.admin_listen` (default 127.0.0.1:9901)"),
        "{err}"
    );
    let (code, _, err) = check(&format!(
        "[server]\nlisten = \"[::]:18481\"\nadmin_listen = \"127.0.0.1:18482\"\ntls_listen = \"0.0.0.0:18481\"\n\
         [server.tls]\ndefault_cert = \"c.pem\"\ndefault_key = \"c.key\"\n{BASE}"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PATH:4:14: `server.tls_listen` (0.0.0.0:18481) must not share its port"),
        "{err}"
    );
    // Different ports, or IPv4 and IPv6 loopbacks: fine.
    let (code, _, err) = check(&format!(
        "[server]\nlisten = \"0.0.0.0:18483\"\nadmin_listen = \"127.0.0.1:18484\"\n{BASE}"
    ));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check(&format!(
        "[server]\nlisten = \"[::1]:18485\"\nadmin_listen = \"127.0.0.1:18485\"\n{BASE}"
    ));
    assert_eq!(code, 0, "{err}");
}

/// `forward_header` naming a header a credential source reads would replace the
/// credential with the tenant id before the upstream saw it (a client's
/// `Authorization` reached the upstream as `authorization: acme`).
#[test]
fn forward_header_may_not_be_a_credential_header() {
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"jwt\", \"host\"]\nforward_header = \"authorization\"\n{BASE}"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PATH:3:18: `tenancy.forward_header` and `tenancy.jwt.header` are both \"authorization\""),
        "{err}"
    );
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"api_key\", \"host\"]\n[tenancy.api_key]\nheader = \"x-tenant-id\"\n{BASE}"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PATH:4:10: `tenancy.api_key.header` and `tenancy.forward_header` are both \"x-tenant-id\""),
        "{err}"
    );
    // The header source reads the header the id is forwarded in: by design.
    let (code, _, err) = check(&format!("[tenancy]\nresolve = [\"header\"]\n{BASE}"));
    assert_eq!(code, 0, "{err}");
}

/// A feature with a space at either end reached the upstream changed (`" x"` as `x`:
/// a header value is trimmed), so it is refused, as a comma is.
#[test]
fn a_feature_with_a_space_at_either_end_is_refused() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.a]\nhosts = [\"a.test\"]\nfeatures = [\"beta search\", \" x\", \"y \"]\n"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("\"beta search\""), "{err}");
    assert!(err.contains("PATH:7:28: feature \" x\""), "{err}");
    assert!(err.contains("PATH:7:34: feature \"y \""), "{err}");
}

/// A leeway of hours or more keeps expired tokens working; it was accepted silently
/// (up to ten years, the bound of every duration).
#[test]
fn a_jwt_leeway_past_minutes_is_a_warning() {
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"host\"]\n[tenancy.jwt]\nleeway = \"2h\"\n{BASE}"
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.trim(),
        "PATH:4:10: warning: `tenancy.jwt.leeway` of 2h: a token is still accepted that long after it expired (and that long before its nbf); leeway covers clock skew, seconds to a minute",
    );
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"host\"]\n[tenancy.jwt]\nleeway = \"60s\"\n{BASE}"
    ));
    assert_eq!((code, err.as_str()), (0, ""));
}

/// A feature listed twice was forwarded twice (`x-tenant-features: beta,beta`).
#[test]
fn a_feature_listed_twice_is_a_warning() {
    let (code, _, err) = check(&format!(
        "{BASE}[tenants.a]\nhosts = [\"a.test\"]\nfeatures = [\"beta\", \"sso\", \"beta\"]\n"
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.trim(),
        "PATH:7:28: warning: feature \"beta\" of tenant \"a\" is listed twice: it is forwarded once",
    );
}

/// An empty claim or cookie name names nothing: every token would be refused for
/// want of a tenant claim. Each was accepted silently.
#[test]
fn empty_jwt_claim_and_cookie_names_are_refused() {
    let (code, _, err) = check(&format!(
        "[tenancy]\nresolve = [\"jwt\", \"host\"]\n[tenancy.jwt]\ntenant_claim = \"\"\ncookie = \" \"\n{BASE}"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PATH:4:16: `tenancy.jwt.tenant_claim` must not be empty"),
        "{err}"
    );
    assert!(
        err.contains("PATH:5:10: `tenancy.jwt.cookie` must not be empty"),
        "{err}"
    );
}

/// `bulkhead check --config PATH`: exit code and stderr, or a panic when it has not
/// exited within 10 s (it is killed first).
fn check_path_within(path: &std::path::Path) -> (i32, String) {
    bulkhead_within(&["check".as_ref(), "--config".as_ref(), path.as_os_str()])
}

/// `bulkhead ARGS`: exit code and stderr, or a panic when it has not exited within
/// 10 s (it is killed first).
fn bulkhead_within(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`bulkhead {args:?}` still running after 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An audit log whose directory does not exist: the gateway starts and reloads without
/// it (a `warn` line each time), and `check` said nothing. Now a warning at the key
/// naming the directory (exit 0; 1 with --strict); `check` makes neither.
#[test]
fn an_audit_log_in_a_missing_directory_is_a_warning_at_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let d = dir.path().display().to_string();
    let run = |audit: &str, strict: bool| {
        std::fs::write(
            &path,
            format!(
                "[server]\naudit_log = \"{audit}\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
            ),
        )
        .unwrap();
        let mut args = vec!["check".as_ref(), "--config".as_ref(), path.as_os_str()];
        if strict {
            args.push("--strict".as_ref());
        }
        let (code, err) = bulkhead_within(&args);
        (code, err.replace(&d, "DIR"))
    };
    for (audit, what) in [
        ("logs/audit.jsonl", "\"DIR/logs\" does not exist"),
        (
            "DIR/no/such/dir/audit.jsonl",
            "\"DIR/no/such/dir\" does not exist",
        ),
        (
            "gateway.toml/audit.jsonl",
            "\"DIR/gateway.toml\" is not a directory",
        ),
    ] {
        let audit = audit.replace("DIR", &d);
        let (code, err) = run(&audit, false);
        assert_eq!(code, 0, "{err}");
        let audit = audit.replace(&d, "DIR");
        assert_eq!(
            err.lines().next().unwrap_or_default(),
            format!("DIR/gateway.toml:2:13: warning: `server.audit_log` \"{audit}\": its directory {what}, so the file cannot be made: the gateway starts and reloads without writing the audit log (a `warn` line each time)"),
            "{err}"
        );
        let (code, err) = run(&audit.replace("DIR", &d), true);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("1 warning(s); failing because of --strict"),
            "{err}"
        );
    }
    assert!(!dir.path().join("logs").exists());
    // Once the directory is there: no warning, and still no file made by `check`.
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let (code, err) = run("logs/audit.jsonl", true);
    assert_eq!((code, err.as_str()), (0, ""), "{err}");
    assert!(!dir.path().join("logs/audit.jsonl").exists());
}

/// An audit log that is a FIFO nobody reads (a log shipper not up yet): the gateway
/// opened it at start and waited there for a reader, for good (SIGTERM did not end
/// it either: signals are acted on once it serves). It fails at once, naming the key
/// and the path.
#[test]
fn an_audit_log_that_is_a_fifo_fails_the_start_at_once() {
    let dir = tempfile::tempdir().unwrap();
    support::mkfifo(&dir.path().join("audit.fifo"));
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             audit_log = \"audit.fifo\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
        ),
    )
    .unwrap();
    let (code, err) = bulkhead_within(&[
        "run".as_ref(),
        "--no-watch".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("`server.audit_log` ")
            && err.contains("audit.fifo\" is a FIFO, not a regular file"),
        "{err}"
    );
}

/// `check` says what the gateway would refuse at start or in a reload: an audit log
/// that is a FIFO, a device or a socket, at the key. It passed, looking only for a
/// directory. It looks at the path's type without opening it (that would wait for a
/// FIFO's reader) and makes no file.
#[test]
fn an_audit_log_that_is_a_fifo_or_a_device_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    support::mkfifo(&dir.path().join("audit.fifo"));
    let path = dir.path().join("gateway.toml");
    for (log, kind) in [
        ("audit.fifo", "a FIFO"),
        ("/dev/null", "a character device"),
    ] {
        std::fs::write(
            &path,
            format!("[server]\naudit_log = \"{log}\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"),
        )
        .unwrap();
        let (code, err) = check_path_within(&path);
        assert_eq!(code, 1, "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "{}:2:13: `server.audit_log` \"{log}\" is {kind}, not a regular file; the audit log is appended to a regular file (made when missing), never to a FIFO, a device or a socket, whose writes can block or be lost",
                path.display()
            )
        );
    }
    std::fs::write(
        &path,
        format!(
            "[server]\naudit_log = \"audit.jsonl\"\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n"
        ),
    )
    .unwrap();
    let (code, err) = check_path_within(&path);
    assert_eq!(code, 0, "{err}");
    assert!(!dir.path().join("audit.jsonl").exists());
}

/// A FIFO, or a device, where the config or a file it names should be: refused with
/// the path and why, at once. Reading it waited for a writer that never came (and
/// `/dev/zero` never ends).
#[test]
fn a_fifo_or_a_device_in_a_files_place_is_refused_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    support::mkfifo(&config);
    let (code, err) = check_path_within(&config);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:1:1: cannot read the file: not a regular file (a FIFO)",
            config.display()
        )
    );
    std::fs::remove_file(&config).unwrap();

    // A CA bundle, an HMAC secret, a certificate.
    let fifo = dir.path().join("named.pem");
    support::mkfifo(&fifo);
    for (text, want) in [
        (
            format!("{BASE}[upstreams.x]\ntargets = [\"https://a.com\"]\nca = \"named.pem\"\n"),
            format!(
                "cannot read the upstream CA bundle {}: not a regular file (a FIFO)",
                fifo.display()
            ),
        ),
        (
            format!("[tenancy]\nresolve = [\"jwt\", \"host\"]\n{BASE}[tenants.acme]\nhosts = [\"a.com\"]\n[tenants.acme.jwt]\nhs256_secret_file = \"/dev/zero\"\n"),
            "cannot read /dev/zero: not a regular file (a character device)".to_owned(),
        ),
        (
            format!("[server]\ntls_listen = \"127.0.0.1:0\"\n[server.tls]\ndefault_cert = \"named.pem\"\ndefault_key = \"named.pem\"\n{BASE}"),
            format!(
                "cannot read the certificate {}: not a regular file (a FIFO)",
                fifo.display()
            ),
        ),
    ] {
        std::fs::write(&config, &text).unwrap();
        let (code, err) = check_path_within(&config);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&want), "want {want:?} in {err}");
    }
}
