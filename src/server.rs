//! Listeners, accept loops and graceful shutdown. Thread per core: each worker thread
//! runs its own `current_thread` runtime, accepts on a clone of the one listening
//! socket and owns its own upstream pool, so nothing on the request path crosses
//! threads except the snapshot pointer.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::proxy::{self, ConnCtx};
use crate::snapshot::Snapshot;
use crate::upstream;

/// State shared by every worker and the admin listener.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Set from the first moment of draining; `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Settings fixed for the life of the process (listeners, workers, timeouts).
    pub config: Config,
    /// The config in force, reload history and counters.
    pub reload: crate::reload::ReloadState,
}

/// A gateway that is serving. Dropping it does not stop it: call
/// [`RunningGateway::shutdown`] then [`RunningGateway::wait`].
pub struct RunningGateway {
    pub listen_addr: SocketAddr,
    /// `server.tls_listen`, bound.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    admin_stop: watch::Sender<bool>,
    admin: JoinHandle<()>,
}

impl RunningGateway {
    /// Binds the listeners and starts serving `config`.
    pub fn start(config: Config) -> io::Result<RunningGateway> {
        let snapshot = Snapshot::build(&config, None)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = bind(config.listen)?;
        let tls_listener = config.tls_listen.map(bind).transpose()?;
        let admin_listener = bind(config.admin_listen)?;
        let listen_addr = listener.local_addr()?;
        let tls_addr = tls_listener
            .as_ref()
            .map(StdListener::local_addr)
            .transpose()?;
        let redirect_to = tls_addr.filter(|_| config.redirect_http).map(|a| a.port());
        let admin_addr = admin_listener.local_addr()?;
        let workers_n = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let nofile = nofile();
        let max_connections = connection_limit(config.max_connections, nofile);
        tracing::info!(nofile, max_connections, "file descriptors");
        let per_worker = max_connections.div_ceil(workers_n);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            reload: crate::reload::ReloadState::new(&config)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            config,
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut workers = Vec::with_capacity(workers_n);
        for i in 0..workers_n {
            let worker_err = |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start worker {} of {workers_n}: {e}", i + 1),
                )
            };
            let l = listener.try_clone().map_err(worker_err)?;
            let tl = tls_listener
                .as_ref()
                .map(StdListener::try_clone)
                .transpose()
                .map_err(worker_err)?;
            let shared = shared.clone();
            let rx = shutdown_rx.clone();
            // Built here, so that running out of descriptors or memory is an error from
            // `start`, not a panic in the thread.
            let rt = runtime().map_err(worker_err)?;
            workers.push(
                std::thread::Builder::new()
                    .name(format!("bulkhead-worker-{i}"))
                    .spawn(move || {
                        if rt.block_on(worker(l, tl, redirect_to, per_worker, shared, rx)) {
                            cut_off(rt);
                        }
                    })
                    .map_err(worker_err)?,
            );
        }
        drop(listener);
        drop(tls_listener);

        let (admin_stop, admin_rx) = watch::channel(false);
        let admin_shared = shared.clone();
        let rt = runtime()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the admin thread: {e}")))?;
        let admin = std::thread::Builder::new()
            .name("bulkhead-admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(prune_limiters(admin_shared.clone()));
                    tokio::spawn(crate::cluster::run(admin_shared.clone()));
                    crate::admin::serve(admin_listener, admin_shared.clone(), admin_rx).await;
                    // The workers have drained: give leases back, save quota counters.
                    crate::cluster::shutdown(&admin_shared).await;
                });
            })?;
        Ok(RunningGateway {
            listen_addr,
            tls_addr,
            admin_addr,
            shared,
            shutdown_tx,
            workers,
            admin_stop,
            admin,
        })
    }

    /// Logs "bulkhead is serving" with the addresses bound. The command logs it once it
    /// holds the gateway, so that a signal after the line drains it, one before the
    /// line stops the start (src/main.rs).
    pub fn log_serving(&self) {
        let (listen, admin, workers) = (self.listen_addr, self.admin_addr, self.workers.len());
        match self.tls_addr {
            Some(tls) => {
                tracing::info!(%listen, tls_listen = %tls, %admin, workers, "bulkhead is serving")
            }
            None => tracing::info!(%listen, %admin, workers, "bulkhead is serving"),
        }
    }

    /// Starts draining: `/readyz` turns 503, listeners close (new connections are
    /// refused), idle connections close, in-flight requests run to completion for up
    /// to `shutdown_grace`.
    pub fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.shutdown_tx.send(true);
    }

    /// Waits until every worker has drained, then stops the admin listener.
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
        let _ = self.admin_stop.send(true);
        let _ = self.admin.join();
    }
}

/// Keyed (per-client) limiter state grows with every new client address; every
/// `limiter_prune_interval` the buckets that are full again are dropped, so a flood of
/// distinct clients cannot grow memory without bound.
async fn prune_limiters(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.limiter_prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let snap = shared.snapshot.load_full();
        for t in snap.tenants.iter().filter(|t| t.limits.has_client_rate()) {
            let left = t.limits.prune();
            tracing::trace!(tenant = %t.id, keys = left, "pruned per-client limiter state");
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

thread_local! {
    /// On a worker thread whose `shutdown_grace` ran out, while its runtime drops what
    /// is left: the requests cut off so far. `None` otherwise.
    static CUT_OFF: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Whether a request dropped unanswered now is being cut off because
/// `shutdown_grace` ran out (rather than because its client went away); if so, counts
/// it. For the access-log line of such a request (`reason="shutdown"`).
pub(crate) fn cut_off_by_shutdown() -> bool {
    CUT_OFF.with(|c| match c.get() {
        Some(n) => {
            c.set(Some(n + 1));
            true
        }
        None => false,
    })
}

/// Drops a worker's runtime after its `shutdown_grace` ran out, and with it the
/// connections still open and their requests (each logged as it goes, see
/// [`cut_off_by_shutdown`]); says how many requests were cut off.
fn cut_off(rt: tokio::runtime::Runtime) {
    CUT_OFF.with(|c| c.set(Some(0)));
    drop(rt);
    let cut = CUT_OFF.with(|c| c.take()).unwrap_or(0);
    if cut > 0 {
        tracing::warn!(requests = cut, "shutdown_grace ran out: requests cut off");
    }
}

/// Rate-limits a warning that could otherwise fill the log (a flood of connections
/// at a limit, accept failing on EMFILE): due at most once every ten seconds.
#[derive(Default)]
pub(crate) struct Quiet {
    last: Option<std::time::Instant>,
}

impl Quiet {
    pub(crate) fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        let due = self
            .last
            .is_none_or(|l| now.duration_since(l) >= Duration::from_secs(10));
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// Counts a worker's open connections so draining can wait for them, and so the
/// worker stops accepting at its `limit`.
#[derive(Default)]
struct Tracker {
    open: AtomicUsize,
    idle: Notify,
    limit: usize,
    /// A connection closed while the worker was at its limit.
    freed: Notify,
}

/// The soft `RLIMIT_NOFILE` in force (`u64::MAX` when unlimited or unknown).
fn nofile() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do: a service manager's default soft limit
/// (1,024 under systemd) would otherwise cap a gateway at about a thousand clients.
/// `RunningGateway::start` then logs the limit and the connections it allows.
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::debug!(error = %e, "cannot raise RLIMIT_NOFILE");
        }
    }
}

/// Open client connections allowed in all (`server.max_connections`; 0: from the
/// descriptors, `nofile`). Each proxied connection needs a second descriptor upstream,
/// and a reserve stays for the admin listener, the config watcher and files: so half
/// of what is left after `min(256, nofile / 4)`.
pub fn connection_limit(configured: u64, nofile: u64) -> usize {
    let n = if configured > 0 {
        configured
    } else {
        let reserve = (nofile / 4).min(256);
        (nofile.saturating_sub(reserve) / 2).max(1)
    };
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Counts one open connection of a worker until dropped.
pub struct ConnGuard(Arc<Tracker>);

impl Tracker {
    fn enter(self: &Arc<Self>) -> ConnGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone())
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let before = self.0.open.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            self.0.idle.notify_waiters();
        }
        if before == self.0.limit {
            self.0.freed.notify_one();
        }
    }
}

/// How often a worker checks whether it is idle, to give freed memory back.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// One worker's (or the admin thread's, or `--demo`'s) event loop, built before its
/// thread starts so that a failure is an error, not a panic in the thread.
pub(crate) fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// hyper's own limit on a request head, fixed when the listeners start: a backstop
/// above `max_header_bytes`, so that an oversized head normally gets the JSON 431.
pub fn hyper_header_limit(max_header_bytes: u64) -> usize {
    usize::try_from(max_header_bytes.saturating_mul(2).max(64 * 1024)).unwrap_or(usize::MAX)
}

/// Per-worker connection settings, built once.
struct WorkerCtx {
    shared: Arc<Shared>,
    client: Arc<upstream::UpstreamClient>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// The gateway's own HTTP/2 server (`crate::h2`), unless `BULKHEAD_H2=hyper`.
    h2_own: crate::h2::Config,
    header_read_timeout: Duration,
    /// `server.redirect_http`: the https port plain requests are sent to.
    redirect_to: Option<u16>,
    /// hyper's limit on a request head; the fast path hands longer heads to hyper.
    hyper_limit: usize,
    /// The HTTP/1.1 fast path serves plain connections (see `crate::h1`).
    fast_h1: bool,
}

/// A worker's accept loop, then its drain. True when `shutdown_grace` ran out with
/// connections still open (dropping the runtime closes them).
async fn worker(
    listener: StdListener,
    tls_listener: Option<StdListener>,
    redirect_to: Option<u16>,
    max_connections: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let (listener, tls_listener) = match (
        TcpListener::from_std(listener),
        tls_listener.map(TcpListener::from_std).transpose(),
    ) {
        (Ok(l), Ok(t)) => (l, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "worker cannot use the listener");
            return false;
        }
    };
    let cfg = &shared.config;
    // hyper's own limit is a backstop above ours, so that an oversized head normally
    // gets the JSON 431 from the proxy rather than hyper's empty one.
    let hyper_limit = hyper_header_limit(cfg.max_header_bytes);
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(hyper_limit)
        .max_headers(crate::h1::wire::MAX_HEADER_FIELDS);
    // One set of HTTP/2 settings for both servers (ours, and hyper's behind
    // BULKHEAD_H2=hyper).
    let h2_own = crate::h2::Config {
        max_concurrent_streams: 256,
        max_header_list_size: u32::try_from(hyper_limit).unwrap_or(u32::MAX),
        keep_alive_interval: Duration::from_secs(30),
        keep_alive_timeout: Duration::from_secs(20),
        body_idle_timeout: None,
        header_timeout: cfg.header_read_timeout,
    };
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(h2_own.max_header_list_size)
        .max_concurrent_streams(h2_own.max_concurrent_streams)
        .keep_alive_interval(h2_own.keep_alive_interval)
        .keep_alive_timeout(h2_own.keep_alive_timeout);
    let ctx = Arc::new(WorkerCtx {
        client: upstream::UpstreamClient::new(),
        h1,
        h2,
        h2_own,
        header_read_timeout: cfg.header_read_timeout,
        redirect_to,
        hyper_limit,
        fast_h1: crate::h1::enabled(),
        shared: shared.clone(),
    });
    let tracker = Arc::new(Tracker {
        limit: max_connections.max(1),
        ..Tracker::default()
    });
    let (mut full_warned, mut failed_warned) = (Quiet::default(), Quiet::default());
    // Idle upstream connections are let go of on time even when nothing uses their
    // target any more (it went quiet, or a reload removed it).
    let client = ctx.client.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(upstream::POOL_SWEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            client.sweep();
        }
    });
    let fast = (ctx.fast_h1 && ctx.redirect_to.is_none()).then(|| {
        let (hyper_ctx, hyper_rx) = (ctx.clone(), shutdown.clone());
        let to_hyper: crate::h1::ToHyper = Box::new(move |h, conn_ctx, guard| {
            let (ctx, rx) = (hyper_ctx.clone(), hyper_rx.clone());
            Box::pin(async move {
                let peer = h
                    .stream
                    .peer_addr()
                    .unwrap_or_else(|_| SocketAddr::new(conn_ctx.peer, 0));
                let io = Prefixed {
                    prefix: h.prefix,
                    inner: h.stream,
                };
                serve(io, h.h2, peer, conn_ctx, ctx, rx).await;
                drop(guard);
            })
        });
        crate::h1::Worker::new(
            ctx.header_read_timeout,
            ctx.hyper_limit,
            shutdown.clone(),
            to_hyper,
        )
    });

    // A worker whose every open connection is parked (or that has none) is idle: what
    // its last burst freed goes back to the system (RETURN_FREED_MEMORY).
    if let Some(&give_back) = crate::RETURN_FREED_MEMORY.get() {
        let (tracker, fast) = (tracker.clone(), fast.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(IDLE_CHECK_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let parked = fast.as_ref().map_or(0, |w| w.parked());
                if tracker.open.load(Ordering::Acquire) <= parked {
                    give_back();
                }
            }
        });
    }

    loop {
        if tracker.open.load(Ordering::Acquire) >= tracker.limit {
            // At the worker's share of `server.max_connections`: new connections wait
            // in the listen queue (another worker may take them) until one of this
            // worker's closes, instead of being accepted into EMFILE, where upstream
            // connections and the admin listener would fail too.
            if full_warned.due() {
                tracing::warn!(
                    limit = tracker.limit,
                    "connection limit reached (server.max_connections); new connections wait"
                );
            }
            tokio::select! {
                _ = tracker.freed.notified() => continue,
                _ = shutdown.changed() => break,
            }
        }
        let (accepted, tls) = tokio::select! {
            a = listener.accept() => (a, false),
            a = accept_tls(tls_listener.as_ref()) => (a, true),
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) if !tls && fast.is_some() => {
                // The HTTP/1.1 fast path: parked until the first bytes arrive.
                let _ = stream.set_nodelay(true);
                if let Some(fast) = &fast {
                    fast.accept(crate::h1::Conn {
                        stream,
                        ctx: conn_ctx(&ctx, peer, None),
                        guard: tracker.enter(),
                        fresh: true,
                    });
                }
            }
            Ok((stream, peer)) => {
                let guard = tracker.enter();
                let ctx = ctx.clone();
                let rx = shutdown.clone();
                tokio::spawn(async move {
                    if tls {
                        // Boxed (in its own statement, or the future's space is
                        // still reserved in the task): an idle plain connection's task
                        // stays small.
                        let tls = Box::pin(serve_tls(stream, peer, ctx, rx));
                        tls.await;
                    } else {
                        serve_plain(stream, peer, ctx, rx).await;
                    }
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, and say so at most
                // every 10 s (a flood of connections would write the log full).
                if failed_warned.due() {
                    tracing::warn!(error = %e, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drop(tls_listener);
    let grace = shared.config.shutdown_grace;
    if tokio::time::timeout(grace, tracker.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.open.load(Ordering::Relaxed),
            "connections still open after shutdown_grace; closing them"
        );
        return true;
    }
    false
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The TLS listener's next connection; never ready when there is none.
async fn accept_tls(l: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A connection on the TLS listener: handshake (the certificate chosen by SNI), then
/// HTTP/2 or HTTP/1.1 as ALPN agreed.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<WorkerCtx>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let Some((tls, conn)) =
        crate::tls::accept(stream, peer, &ctx.shared.snapshot, ctx.header_read_timeout).await
    else {
        return;
    };
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let conn_ctx = conn_ctx(&ctx, peer, Some(Box::new(conn)));
    serve(tls, is_h2, peer, conn_ctx, ctx, shutdown).await;
}

/// What a connection's requests share.
fn conn_ctx(
    ctx: &WorkerCtx,
    peer: SocketAddr,
    tls: Option<Box<crate::tls::ConnTls>>,
) -> Arc<ConnCtx> {
    Arc::new(ConnCtx {
        shared: ctx.shared.clone(),
        client: ctx.client.clone(),
        peer: peer.ip(),
        peer_ip: HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value"),
        redirect_to: if tls.is_none() { ctx.redirect_to } else { None },
        tls,
        hpack_names: Default::default(),
    })
}

/// A connection on the plain listener when the fast path is off (`BULKHEAD_H1=hyper`,
/// `redirect_http`): HTTP/1.1, or HTTP/2 with prior knowledge, both by hyper.
async fn serve_plain(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<WorkerCtx>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let conn_ctx = conn_ctx(&ctx, peer, None);
    let hyper = Box::pin(sniff_and_serve(stream, peer, conn_ctx, ctx, shutdown));
    hyper.await;
}

/// Chooses HTTP/1.1 or HTTP/2 (prior knowledge) from the first bytes, under the
/// header read timeout so a client that sends nothing is cut off too; hyper serves.
async fn sniff_and_serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    conn_ctx: Arc<ConnCtx>,
    ctx: Arc<WorkerCtx>,
    shutdown: watch::Receiver<bool>,
) {
    let mut buf = [0u8; 24];
    let mut len = 0;
    let sniff = async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok::<_, io::Error>(None);
            }
            len += n;
            if buf[..len] != H2_PREFACE[..len] {
                return Ok(Some(false));
            }
            if len == H2_PREFACE.len() {
                return Ok(Some(true));
            }
        }
    };
    let is_h2 = match tokio::time::timeout(ctx.header_read_timeout, sniff).await {
        Ok(Ok(Some(h2))) => h2,
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!(%peer, "closing a connection that sent no request in time");
            return;
        }
    };
    let io = Prefixed {
        prefix: bytes::Bytes::copy_from_slice(&buf[..len]),
        inner: stream,
    };
    serve(io, is_h2, peer, conn_ctx, ctx, shutdown).await;
}

async fn serve<I>(
    io: I,
    is_h2: bool,
    peer: SocketAddr,
    conn_ctx: Arc<ConnCtx>,
    ctx: Arc<WorkerCtx>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body_idle = ctx.shared.snapshot.load().body_idle_timeout;
    let io = Stalls::new(io, body_idle, "the client", "server.body_idle_timeout");
    if is_h2 && crate::h2::enabled() {
        // The gateway's own HTTP/2 server; each stream's handler is boxed once.
        let service = move |req: Request<crate::limits::ClientBody>| -> crate::h2::Handler {
            let ctx = conn_ctx.clone();
            if let Some(t) = req.extensions().get::<crate::h2::TooLarge>() {
                let e = crate::error::ProxyError::HeadersTooLarge {
                    size: t.size as u64,
                    limit: t.limit as u64,
                };
                return Box::pin(async move {
                    match proxy::refuse_head(e, ctx).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    }
                });
            }
            Box::pin(async move {
                match proxy::handle(req, ctx).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            })
        };
        let cfg = crate::h2::Config {
            body_idle_timeout: body_idle,
            ..ctx.h2_own.clone()
        };
        if let Err(e) = crate::h2::serve(io, &cfg, service, shutdown).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        return;
    }
    let result = if is_h2 {
        // Boxed: hyper moves the service future into each HTTP/2 stream's task (and
        // around inside hyper); a pointer moves for free, the ~3 KiB future does not.
        let service = service_fn(move |req: Request<Incoming>| {
            Box::pin(proxy::handle(
                req.map(crate::limits::ClientBody::Hyper),
                conn_ctx.clone(),
            ))
        });
        drive(
            ctx.h2.serve_connection(TokioIo::new(io), service),
            |c| c.graceful_shutdown(),
            &mut shutdown,
        )
        .await
    } else {
        // Each request head is checked before hyper reads it, so that one hyper would
        // refuse with an empty 400 or 431 gets the gateway's JSON answer instead.
        let verdict = Arc::new(crate::h1::Verdict::default());
        let io = crate::h1::Checked::new(io, ctx.hyper_limit, verdict.clone());
        let service = service_fn(move |req: Request<Incoming>| -> proxy::Handled {
            match verdict.refusal() {
                Some(e) => Box::pin(proxy::refuse_head(e, conn_ctx.clone())),
                None => {
                    let (verdict, ctx) = (verdict.clone(), conn_ctx.clone());
                    let shared = Arc::clone(&ctx.shared);
                    Box::pin(async move {
                        let req = req.map(crate::limits::ClientBody::Hyper);
                        let mut resp = proxy::handle(req, ctx).await?;
                        // hyper closes after an answer that leaves the body unread; and
                        // once draining began, this connection's graceful shutdown may
                        // not have reached hyper yet when the answer is written (the
                        // fast path reads the same flag). Either way the answer says so,
                        // and hyper closes after a `connection: close` it sends. Not
                        // on a 101: its `connection: upgrade` hands the connection over.
                        let closing =
                            verdict.body_arriving() || shared.draining.load(Ordering::Relaxed);
                        if closing && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                            resp.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                        Ok(resp)
                    })
                }
            }
        });
        drive(
            ctx.h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
            |c| c.graceful_shutdown(),
            &mut shutdown,
        )
        .await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Runs a connection to its end; on shutdown, asks it to finish gracefully (in-flight
/// requests complete, no new ones are read) and keeps driving it.
async fn drive<C, E>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    if !*shutdown.borrow() {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = shutdown.changed() => {}
        }
    }
    graceful(conn.as_mut());
    conn.await
}

/// A client connection whose writes are bounded by a setting (`server.body_idle_timeout`
/// here, `server.header_read_timeout` on the admin listener): a client that takes no
/// byte for that long while the gateway has bytes for it (a response it does not read)
/// gets an error on the write, and hyper (or the gateway's HTTP/2 server) closes the
/// connection, ending its responses and releasing their in-flight slots. A write that
/// completes at once never reads the clock.
pub(crate) struct Stalls<I> {
    inner: I,
    /// `None`: no bound ("0s").
    wait: Option<crate::body::IdleWait>,
    /// The client, and the setting that bounds it, as the error names them.
    who: &'static str,
    setting: &'static str,
}

impl<I> Stalls<I> {
    pub(crate) fn new(
        inner: I,
        idle: Option<Duration>,
        who: &'static str,
        setting: &'static str,
    ) -> Stalls<I> {
        Stalls {
            inner,
            wait: idle.map(crate::body::IdleWait::new),
            who,
            setting,
        }
    }

    /// What a write returned, or an error once writes have waited `idle` in a row.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(wait) = &mut self.wait else {
            return polled;
        };
        if polled.is_ready() {
            wait.progress();
            return polled;
        }
        match wait.poll_expired(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} took no byte for {:?} ({})",
                    self.who, wait.idle, self.setting
                ),
            ))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Stalls<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, out)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Stalls<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.bound(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.bound(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.bound(cx, polled)
    }
}

/// A TCP stream with the bytes already read (for protocol detection, or by the fast
/// path) put back in front.
struct Prefixed {
    prefix: bytes::Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
