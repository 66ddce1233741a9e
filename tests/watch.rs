//! The file watcher against the ways deploy tools change files: a Capistrano
//! `current` symlink swapped, the config directory replaced whole, a ConfigMap swap
//! under the binary, a writer that pauses mid-file, and edits that leave the file
//! unreadable. Real files, real sockets.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::time::{Duration, Instant};

use support::*;

async fn history(admin: SocketAddr) -> Vec<serde_json::Value> {
    let r = get(admin, "/config/history", &[]).await;
    assert_eq!(r.status, 200);
    r.json().as_array().unwrap().clone()
}

/// Polls `/config/history` until its newest entry satisfies `pred`.
async fn until_history(
    admin: SocketAddr,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let h = history(admin).await;
        if pred(&h[0]) {
            return h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "history never matched: {:#}",
            h[0]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(admin: SocketAddr) -> String {
    String::from_utf8_lossy(&get(admin, "/metrics", &[]).await.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capistrano_current_symlink_swap_is_followed() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in [1, 2] {
        std::fs::create_dir_all(d.join(format!("releases/{n}"))).unwrap();
    }
    write_config(
        &d.join("releases/1/gateway.toml"),
        &blue_green_config("blue", &blue, &green),
    );
    write_config(
        &d.join("releases/2/gateway.toml"),
        &blue_green_config("green", &blue, &green),
    );
    symlink("releases/1", d.join("current")).unwrap();
    let gw = Gateway::start_at(&d.join("current/gateway.toml"));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    // `ln -sfn releases/2 current.tmp && mv -T current.tmp current`.
    symlink("releases/2", d.join("current.tmp")).unwrap();
    std::fs::rename(d.join("current.tmp"), d.join("current")).unwrap();
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(5)).await;

    // The old release is no longer the config: editing it changes nothing, while an
    // edit to the new one is applied.
    write_config(
        &d.join("releases/1/gateway.toml"),
        &blue_green_config("green", &blue, &blue),
    );
    write_config(
        &d.join("releases/2/gateway.toml"),
        &blue_green_config("blue", &blue, &green),
    );
    until_served_by(gw.addr, "acme.example.com", "blue", Duration::from_secs(5)).await;
    assert_eq!(upstream_for(gw.addr, "globex.example.com").await, "blue");
    let h = history(gw.admin).await;
    assert!(h.iter().all(|e| e["result"] == "success"), "{h:#?}");
    assert_eq!(h.len(), 3, "startup, the swap, the edit: {h:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_config_directory_stays_watched() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let path = conf.join("gateway.toml");
    write_config(&path, &blue_green_config("blue", &blue, &green));
    let gw = Gateway::start_at(&path);
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();

    // Twice: the watch has to move to each new directory.
    for (round, up) in ["green", "blue"].into_iter().enumerate() {
        let old = dir.path().join(format!("conf.old{round}"));
        std::fs::rename(&conf, &old).unwrap();
        std::fs::create_dir(&conf).unwrap();
        write_config(&path, &blue_green_config(up, &blue, &green));
        std::fs::remove_dir_all(&old).unwrap();
        until_served_by(gw.addr, "acme.example.com", up, Duration::from_secs(5)).await;
    }
    // And a later edit in the new directory is still seen.
    write_config(&path, &blue_green_config("green", &blue, &green));
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(5)).await;

    // Removed and made again later, not at once.
    std::fs::remove_dir_all(&conf).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::create_dir(&conf).unwrap();
    write_config(&path, &blue_green_config("blue", &blue, &green));
    until_served_by(gw.addr, "acme.example.com", "blue", Duration::from_secs(5)).await;
    assert_eq!(shared(&gw).reload.failed(), 0);
}

/// kubelet's ConfigMap swap under the binary: applied, and nothing logged at warn
/// (notify warned on every swap, about a watch it removed twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_swap_under_the_binary_logs_no_warning() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let bin = Process::start(&blue_green_config("blue", &blue, &green));
    let d = bin.path.parent().unwrap().to_owned();
    // Turn the started-on file into the layout kubelet makes, atomically.
    std::fs::create_dir(d.join("..v1")).unwrap();
    write_config(
        &d.join("..v1/gateway.toml"),
        &blue_green_config("blue", &blue, &green),
    );
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/gateway.toml", d.join("gateway.toml.tmp")).unwrap();
    std::fs::rename(d.join("gateway.toml.tmp"), &bin.path).unwrap();

    for (n, up) in [(2, "green"), (3, "blue")] {
        let (new, old) = (format!("..v{n}"), format!("..v{}", n - 1));
        std::fs::create_dir(d.join(&new)).unwrap();
        write_config(
            &d.join(&new).join("gateway.toml"),
            &blue_green_config(up, &blue, &green),
        );
        symlink(&new, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join(&old)).unwrap();
        until_served_by(bin.addr, "acme.example.com", up, Duration::from_secs(5)).await;
    }
    // A last edit, so that whatever the swaps logged is in by the time it is seen.
    write_config(
        &d.join("..v3/gateway.toml"),
        &blue_green_config("green", &blue, &green),
    );
    until_served_by(
        bin.addr,
        "acme.example.com",
        "green",
        Duration::from_secs(5),
    )
    .await;
    let log = bin.log.lock().unwrap().join("\n");
    assert!(
        !log.lines().any(|l| l.contains("WARN")),
        "a warning was logged:\n{log}"
    );
}

/// A writer that truncates the file, writes part of it and pauses: the part (valid
/// TOML with no tenants) is not applied; the whole file is, once closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_place_is_applied_once_closed_not_half_written() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();

    // First a whole edit, so that the watcher is past its first read.
    write_config(&path, &blue_green_config("green", &blue, &green));
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(5)).await;

    let full = with_test_listeners(&blue_green_config("blue", &blue, &green));
    let cut = full.find("[tenants.acme]").unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&full.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    // Well past the debounce, short of the fallback for a writer that never closes.
    let pause = Instant::now();
    while pause.elapsed() < Duration::from_millis(600) {
        assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "green");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.write_all(&full.as_bytes()[cut..]).unwrap();
    drop(f);
    until_served_by(gw.addr, "acme.example.com", "blue", Duration::from_secs(5)).await;
    let h = history(gw.admin).await;
    assert_eq!(h.len(), 3, "the half-written file was applied: {h:#?}");
    assert_eq!(h[0]["result"], "success");
    assert_eq!(h[0]["removed"], serde_json::json!([]));

    // A writer that never closes the file: applied after a quiet spell all the same.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(with_test_listeners(&blue_green_config("green", &blue, &green)).as_bytes())
        .unwrap();
    f.flush().unwrap();
    until_served_by(
        gw.addr,
        "acme.example.com",
        "green",
        Duration::from_secs(10),
    )
    .await;
    drop(f);
}

/// A config with no tenants is legitimate, so it is applied; but the reload that
/// removes every tenant says so at warn, where alerts look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_every_tenant_is_applied_with_a_warning() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let bin = Process::start(&blue_green_config("blue", &blue, &green));
    let empty = blue_green_config("blue", &blue, &green);
    let empty = &empty[..empty.find("[tenants.acme]").unwrap()];
    let tmp = bin.path.with_file_name("gateway.toml.new");
    write_config(&tmp, empty);
    std::fs::rename(&tmp, &bin.path).unwrap();
    let line = bin.log_line(&["WARN", "no tenants"]).await;
    assert!(line.contains("removed=2"), "{line}");
    assert_error(
        &get(bin.addr, "/", &[("host", "acme.example.com")]).await,
        404,
        "unknown_tenant",
    );
}

/// A file left unreadable is a failed reload like an invalid one: logged, counted,
/// recorded, once; not-UTF-8 names the first bad byte's line and column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_is_a_failed_reload() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();

    // Not UTF-8: a Latin-1 'é' in a comment on line 3, after "# caf".
    let mut bytes = b"[server]\nworkers = 2\n# caf\xe9\n".to_vec();
    bytes.extend_from_slice(blue_green_config("green", &blue, &green).as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let h = until_history(gw.admin, |e| e["result"] == "failure").await;
    let err = h[0]["error"].as_str().unwrap();
    assert_eq!(
        err,
        format!("{}:3:6: the file is not valid UTF-8", path.display())
    );
    assert_eq!(h[0]["trigger"], "file");
    assert!(metrics(gw.admin)
        .await
        .contains("bulkhead_config_reloads_total{result=\"failure\"} 1"));
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    // A directory in place of the file.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let h = until_history(gw.admin, |e| {
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("cannot read the file"))
    })
    .await;
    assert_eq!(h[0]["result"], "failure");
    assert!(h[0]["version"].is_null());
    assert_eq!(shared(&gw).reload.failed(), 2);
    // Another event in the directory: the same error is not reported again.
    std::fs::write(dir.path().join("other"), "x").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(shared(&gw).reload.failed(), 2);

    std::fs::remove_dir(&path).unwrap();
    write_config(&path, &blue_green_config("green", &blue, &green));
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(5)).await;
    assert_eq!(upstream_for(gw.addr, "globex.example.com").await, "blue");
}

/// With certificate files in force the watcher cannot tell from the text alone that
/// nothing changed, so it parses again on every event in the directory: a rejected
/// file is still reported once, not at every write beside it (the gateway's own log
/// in the directory made that a loop of ~5 failures a second). A certificate fixed
/// under an unchanged text is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_file_beside_certificates_is_reported_once() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = support::pki::Ca::new(d, "ca");
    ca.server("default", &["gateway.test"], 1);
    let good = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         tls_listen = \"127.0.0.1:0\"\nworkers = 2\n\
         [server.tls]\ndefault_cert = \"default.pem\"\ndefault_key = \"default.key\"\n{}",
        blue_green_config("blue", &blue, &green)
    );
    let (gw, path) = Gateway::start_file(d, &good);
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();
    let failed = || shared(&gw).reload.failed();
    // Writes beside the config, as a log file in the directory gets them.
    let write_beside = || async {
        for i in 0..3 {
            std::fs::write(d.join("gateway.log"), format!("line {i}\n")).unwrap();
            tokio::time::sleep(bulkhead::watch::DEBOUNCE * 2).await;
        }
    };

    write_config(&path, &format!("{good}\n[tenants.BAD]\nhosts = [\"x\"]\n"));
    until_history(gw.admin, |e| e["result"] == "failure").await;
    assert_eq!(failed(), 1);
    write_beside().await;
    assert_eq!(failed(), 1, "the same rejected file was reported again");

    // The text is good again but its certificate is broken: a new error, once.
    support::pki::write_atomic(&d.join("default.pem"), b"not a certificate");
    write_config(&path, &good.replace("\"blue\"", "\"green\""));
    let h = until_history(gw.admin, |e| {
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("default.pem"))
    })
    .await;
    assert_eq!(h[0]["result"], "failure");
    assert_eq!(failed(), 2);
    write_beside().await;
    assert_eq!(
        failed(),
        2,
        "the same broken certificate was reported again"
    );
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    // The certificate fixed, the text unchanged: applied.
    ca.server("default", &["gateway.test"], 2);
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(5)).await;
    assert_eq!(failed(), 2);
}
