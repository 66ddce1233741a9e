//! The admin listener (`server.admin_listen`): health, readiness, reload and the
//! config version and history; metrics plug into [`routes::route`]. Never served on the data
//! plane.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

mod conns;
mod renders;
mod routes;
mod wrap;
use conns::{Conn, Conns};
use renders::Renders;
use routes::route;
use wrap::{Tracked, Watched};

use crate::server::Shared;
use crate::server::Stalls;

/// At most this many admin connections are served at once. Health checks and scrapes
/// need a handful; without a cap, idle connections held open cost memory without
/// bound (about 28 KiB each). When every slot is taken, the next connection is
/// accepted and the connection idle longest between requests is closed for it
/// ([`conns`]); when none is idle, the new one waits for a slot, and the ones after it
/// wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a connection closed to make room may take to end once it has nothing in
/// flight: an HTTP/1.1 one closes at once, an HTTP/2 one after its GOAWAY (its client
/// answers the PING that goes with it).
const EVICT_GRACE: Duration = Duration::from_secs(1);

/// Streams an HTTP/2 admin connection may have open at once. curl, scripts and health
/// checks use one; each stream may hold a whole answer until its client has taken it,
/// or for `header_read_timeout` of a client taking nothing ([`conns::Conn::stalled`]),
/// so this times [`MAX_CONNECTIONS`] bounds the answers the admin listener holds.
/// `/metrics` answers (about 9 MB for 10,000 tenants) share their renders, of which at
/// most [`renders::MAX_RENDERS`] are alive.
const MAX_STREAMS: u32 = 4;

/// Serves the admin API until `stop` turns true.
pub async fn serve(listener: StdListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener unusable");
            return;
        }
    };
    let mut builder = http1::Builder::new();
    // A connection that sends no request head in time, or none after its last
    // response, is closed: it would hold one of the MAX_CONNECTIONS slots. So is one
    // whose client stops taking its response for as long ([`Watched`]).
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_read_timeout);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(shared.config.header_read_timeout)
        .keep_alive_timeout(shared.config.header_read_timeout);
    let wait = shared.config.header_read_timeout;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let conns = Conns::new();
    let renders = Renders::new(wait);
    let (mut full_warned, mut accept_warned) = (
        crate::server::Quiet::default(),
        crate::server::Quiet::default(),
    );
    loop {
        // Accepted before a slot is free: a connection waiting is what makes the
        // longest idle one give up its slot. At most this one waits accepted.
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, as the workers do.
                if accept_warned.due() {
                    tracing::warn!(error = %e, "admin accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                if full_warned.due() {
                    tracing::warn!(
                        limit = MAX_CONNECTIONS,
                        "admin connection limit reached; closing the connection idle longest for each new one, or, with none idle, new admin connections wait until one closes"
                    );
                }
                tokio::select! {
                    s = make_room(&slots, &conns) => s,
                    _ = stop.changed() => return,
                }
            }
        };
        let conn = conns.open();
        let tracked = Arc::clone(&conn);
        let (shared, renders) = (shared.clone(), renders.clone());
        let service = service_fn(move |req| {
            // Counted from the head hyper has parsed until the body is taken whole.
            let in_flight = tracked.request();
            let (shared, renders) = (shared.clone(), renders.clone());
            async move {
                let response = route(req, shared, renders).await;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let (h1, h2) = (builder.clone(), h2.clone());
        tokio::spawn(async move {
            // HTTP/2 with prior knowledge (`curl --http2-prior-knowledge`) or HTTP/1.1,
            // told apart by the first bytes; a client that sends neither in time is
            // let go, and so is one chosen to make room before it sent anything.
            let preface = tokio::select! {
                p = tokio::time::timeout(wait, h2_preface(&stream, &conn)) => p,
                () = conn.evicted() => Ok(Err(std::io::ErrorKind::ConnectionAborted.into())),
            };
            match preface {
                Ok(Ok(true)) => {
                    // The preface is no request: idle until a stream opens.
                    conn.idle_now();
                    let io = TokioIo::new(written_within(
                        Watched::new(stream, Arc::clone(&conn), false),
                        wait,
                    ));
                    until_done_or_evicted(h2.serve_connection(io, service), &conn, wait).await;
                }
                Ok(Ok(false)) => {
                    let io = TokioIo::new(written_within(
                        Watched::new(stream, Arc::clone(&conn), true),
                        wait,
                    ));
                    until_done_or_evicted(h1.serve_connection(io, service), &conn, wait).await;
                }
                Ok(Err(_)) | Err(_) => {}
            }
            drop(conn);
            drop(slot);
        });
    }
}

/// Waits for a free slot for a connection already accepted, asking the connection
/// idle longest to close meanwhile (again whenever the one asked declines, busy by
/// then, or none was idle and one goes idle).
async fn make_room(slots: &Arc<Semaphore>, conns: &Conns) -> OwnedSemaphorePermit {
    loop {
        if let Ok(s) = slots.clone().try_acquire_owned() {
            return s;
        }
        conns.evict_longest_idle();
        tokio::select! {
            s = slots.clone().acquire_owned() => return s.expect("the semaphore is never closed"),
            () = conns.changed() => {}
        }
    }
}

/// Serves `connection` until it ends, or, chosen to make room while idle, closes it:
/// hyper's graceful shutdown closes an idle HTTP/1.1 connection at once and sends an
/// HTTP/2 one GOAWAY, finishing any stream its client opened in the meantime. Drops
/// it, at once, when a response has waited `wait` for its client to take a byte.
async fn until_done_or_evicted<C: GracefulConnection>(connection: C, conn: &Conn, wait: Duration) {
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // The connection first: a pipelined request hyper has buffered (it yields
        // every 16) becomes a request before the choice is looked at.
        biased;
        _ = connection.as_mut() => return,
        () = conn.evicted() => {}
        () = conn.stalled(wait) => return stalled(wait),
    }
    connection.as_mut().graceful_shutdown();
    let mut slow = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = conn.stalled(wait) => return stalled(wait),
            () = tokio::time::sleep(EVICT_GRACE) => {
                if conn.in_flight() == 0 {
                    return;
                }
                if !slow {
                    conn.slow_to_close();
                    slow = true;
                }
            }
        }
    }
}

/// `io` with its writes bounded by `header_read_timeout` ([`Stalls`]): a client that
/// takes no byte of its answer for that long is closed.
fn written_within<S>(io: S, wait: Duration) -> Stalls<S> {
    Stalls::new(
        io,
        Some(wait),
        "the admin client",
        "server.header_read_timeout",
    )
}

fn stalled(wait: Duration) {
    tracing::debug!(
        ?wait,
        "closing an admin connection whose client took nothing of a response for server.header_read_timeout"
    );
}

/// Whether the connection starts with the HTTP/2 connection preface (read without
/// taking it: hyper's server reads it again). Waits for the whole preface only while
/// what has come matches it.
async fn h2_preface(stream: &TcpStream, conn: &Conn) -> std::io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n > 0 {
            // A request (or the preface) has begun: not to be closed to make room.
            conn.read();
        }
        if n == 0 || buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // A preface in pieces (peeking again at once would spin on the same bytes).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
