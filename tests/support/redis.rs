//! A real `redis-server` (Debian's package; `scripts/test.sh` installs it) on a free
//! loopback port, in a temporary directory, without persistence; killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments (cluster mode).
    extra: Vec<String>,
    /// TLS only (`rediss://`): the CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
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

/// Whether the TCP socket listening on 127.0.0.1:`port` belongs to process `pid`:
/// its inode in /proc/net/tcp is one of the process's open descriptors.
fn listener_pid_is(port: u16, pid: u32) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Columns: sl local_address rem_address st ... uid timeout inode.
    let local = format!("0100007F:{port:04X}");
    let Some(inode) = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_owned())
    }) else {
        return false;
    };
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == want))
    })
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
        let mut r = Redis::unstarted(Vec::new());
        r.first_start();
        Some(r)
    }

    /// A plain server not started yet, in a new temporary directory.
    fn unstarted(extra: Vec<String>) -> Redis {
        Redis {
            port: 0,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            extra,
            ca: None,
        }
    }

    /// A server started with more `redis-server` arguments (e.g. `--requirepass`).
    pub fn start_with(args: &[&str]) -> Option<Redis> {
        if !available() {
            return None;
        }
        let mut r = Redis::unstarted(args.iter().map(|a| a.to_string()).collect());
        r.first_start();
        Some(r)
    }

    /// A server that speaks TLS only, with a certificate for 127.0.0.1 signed by a CA
    /// made here (`openssl`); `ca` names the CA's PEM file.
    pub fn start_tls() -> Option<Redis> {
        if !available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=bulkhead test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let file = |name: &str| d.join(name).to_str().unwrap().to_owned();
        let mut r = Redis {
            port: 0,
            child: None,
            extra: vec![
                "--tls-cert-file".into(),
                file("server.pem"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
            ca: Some(d.join("ca.pem")),
            dir,
        };
        r.first_start();
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
                let mut r = Redis::unstarted(vec!["--cluster-enabled".into(), "yes".into()]);
                r.first_start();
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
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server on a port that was free a moment ago. Another process (another
    /// test's Redis, say) may take that port in between: then our server cannot bind
    /// it, and a PING would be answered by theirs, so the test would share their data.
    /// So the start counts only when the socket listening on the port is our child's,
    /// and otherwise tries again on another port.
    fn first_start(&mut self) {
        self.start_on_first_of(std::iter::repeat_with(free_port));
    }

    fn start_on_first_of(&mut self, ports: impl Iterator<Item = u16>) {
        for port in ports.take(10) {
            self.port = port;
            if self.spawn_and_wait() {
                return;
            }
        }
        panic!("redis-server could not listen on any of 10 free ports");
    }

    /// A plain server asked to start on `port` first, which another process may hold
    /// (a test of the start itself).
    pub fn start_trying(port: u16) -> Option<Redis> {
        if !available() {
            return None;
        }
        let mut r = Redis::unstarted(Vec::new());
        r.start_on_first_of(std::iter::once(port).chain(std::iter::repeat_with(free_port)));
        Some(r)
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(
            self.spawn_and_wait(),
            "redis-server could not listen on port {} again (another process took it)",
            self.port
        );
    }

    /// Spawns the server on `self.port` and waits until it answers PING; false when it
    /// exited, or when what answers on the port is not it.
    fn spawn_and_wait(&mut self) -> bool {
        self.kill();
        // With TLS the plain port is off and the TLS one is `self.port`.
        let (plain, tls) = if self.ca.is_some() {
            (0, vec!["--tls-port".to_owned(), self.port.to_string()])
        } else {
            (self.port, Vec::new())
        };
        let child = Command::new("redis-server")
            .args(["--port", &plain.to_string()])
            .args(tls)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let pid = child.id();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited {
                self.kill();
                return false;
            }
            if self.ping().is_some() {
                if listener_pid_is(self.port, pid) {
                    return true;
                }
                // Someone else's server answered; ours will exit, or is about to.
                self.kill();
                return false;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> Option<()> {
        if self.ca.is_some() {
            return (self.cli(&["PING"]) == "PONG").then_some(());
        }
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"PING\r\n").ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).ok()?;
        // A server with `requirepass` answers, but not PONG.
        (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH")).then_some(())
    }

    /// Runs `redis-cli` against this server; returns its standard output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(ca) = &self.ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        let out = cmd
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
