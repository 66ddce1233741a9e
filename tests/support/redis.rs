//! A real `redis-server` (Debian's package; `scripts/test.sh` installs it) on a free
//! loopback port, in a temporary directory, without persistence; killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments (cluster mode).
    extra: Vec<String>,
}

/// Whether `redis-server` can be run. In CI (`CI=true`) a missing server fails the
/// test; elsewhere the test is skipped with a loud message.
pub fn available() -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "redis-server is not installed: scripts/test.sh installs Debian's redis-server package"
        );
        eprintln!(
            "\n*** SKIPPED: redis-server is not installed (apt-get install redis-server) ***\n"
        );
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// Starts a server on a free port; `None` (skip) when there is no redis-server
    /// outside CI.
    pub fn start() -> Option<Redis> {
        if !available() {
            return None;
        }
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            extra: Vec::new(),
        };
        r.restart();
        Some(r)
    }

    /// A Redis Cluster of `n` masters (no replicas), each on a free port; the slots
    /// are spread over them by `redis-cli --cluster create`.
    pub fn cluster(n: usize) -> Option<Vec<Redis>> {
        if !available() {
            return None;
        }
        let nodes: Vec<Redis> = (0..n)
            .map(|_| {
                let mut r = Redis {
                    port: free_port(),
                    child: None,
                    dir: tempfile::tempdir().unwrap(),
                    extra: vec!["--cluster-enabled".into(), "yes".into()],
                };
                r.restart();
                r
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let start = Instant::now();
        while !nodes
            .iter()
            .all(|r| r.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the cluster never formed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(nodes)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let start = Instant::now();
        while self.ping().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> Option<()> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"PING\r\n").ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).ok()?;
        (&buf == b"+PONG\r\n").then_some(())
    }

    /// Runs `redis-cli` against this server; returns its standard output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
