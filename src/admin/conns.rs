//! What each open admin connection is doing, so that when every slot is taken the
//! connection idle longest between requests can be closed for a new one, as nginx
//! does with its reusable (keep-alive) connections when it runs out. Without it,
//! `MAX_CONNECTIONS` keep-alive clients that each send a request more often than
//! `header_read_timeout` keep Prometheus and the health checks out for good.
//!
//! A connection is idle from when it is accepted, and from when its last response
//! has been written whole, until a byte of its next request arrives (HTTP/1.1) or
//! its next stream opens (HTTP/2). One that is in the middle of a request or of a
//! response is never chosen. Over HTTP/1.1, a connection whose bytes read so far do
//! not end with an empty line (the end of a head, or of a chunked body) is not idle
//! after its answer either: hyper may hold the start of the next request, read
//! together with the one answered (pipelined).
//!
//! A response body that waits `header_read_timeout` for its next piece to be taken
//! closes its connection ([`Conn::stalled`]): over HTTP/2 a client may read its socket
//! and answer PINGs, so no write ever waits, yet never open its flow-control window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::wrap::InFlight;

/// The admin listener's open connections.
pub(super) struct Conns {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// A connection went idle, or declined to close: the listener, waiting for a
    /// slot, may choose (again).
    changed: Arc<Notify>,
}
/// One admin connection.
pub(super) struct Conn {
    activity: Mutex<Activity>,
    /// The listener chose this connection to make room.
    evict: Notify,
    changed: Arc<Notify>,
    /// A response body began: [`Conn::stalled`] has one to watch.
    body_began: Notify,
}

#[derive(Debug)]
struct Activity {
    /// Requests handed to the service whose responses hyper has not taken whole.
    in_flight: usize,
    /// The last response was taken whole but may still be in hyper's write buffer:
    /// idle once a flush has written it.
    unflushed: bool,
    /// The bytes read so far do not end with an empty line (HTTP/1.1): they may end
    /// with the start of a request that hyper read with the one before and has not
    /// parsed yet, unseen here. Not idle after the answer, then; hyper's
    /// `header_read_timeout` bounds the wait for the rest. (So too after a request
    /// with a `Content-Length` body, whose last bytes are its own: such a connection,
    /// rare on the admin listener, is never closed to make room and only times out.)
    unparsed: bool,
    /// Since when nothing is in progress; `None` while busy.
    idle_since: Option<Instant>,
    /// Chosen by the listener and not yet declined, nor slow to close; while one is,
    /// the listener chooses no other (one new connection, one closed).
    evicting: bool,
    /// Closing since it was chosen: never chosen again.
    closing: bool,
    /// The response bodies hyper has not taken whole, each with since when it has
    /// waited for hyper to take its next piece (keyed by `next_body`).
    bodies: Vec<(u64, Instant)>,
    next_body: u64,
}

impl Conns {
    pub(super) fn new() -> Arc<Conns> {
        Arc::new(Conns {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            changed: Arc::new(Notify::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection just accepted: idle until its first bytes arrive. It counts until
    /// the returned guard is dropped.
    pub(super) fn open(self: &Arc<Self>) -> Registered {
        let conn = Arc::new(Conn {
            activity: Mutex::new(Activity {
                in_flight: 0,
                unflushed: false,
                unparsed: false,
                idle_since: Some(Instant::now()),
                evicting: false,
                closing: false,
                bodies: Vec::new(),
                next_body: 0,
            }),
            evict: Notify::new(),
            changed: self.changed.clone(),
            body_began: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn.clone());
        Registered {
            conns: self.clone(),
            id,
            conn,
        }
    }

    /// Asks the connection idle longest to close, unless one asked before has not
    /// closed or declined yet; with none idle, asks none.
    pub(super) fn evict_longest_idle(&self) {
        let open = self.lock();
        let mut longest: Option<(Instant, &Arc<Conn>)> = None;
        for conn in open.values() {
            let a = conn.lock();
            if a.evicting {
                return;
            }
            if a.closing {
                continue;
            }
            if let Some(since) = a.idle_since {
                if longest.is_none_or(|(l, _)| since < l) {
                    longest = Some((since, conn));
                }
            }
        }
        if let Some((_, conn)) = longest {
            conn.lock().evicting = true;
            conn.evict.notify_one();
        }
    }

    /// Resolves when a connection went idle or declined to close since the last time
    /// (a notification sent while nobody waited is kept for the next wait).
    pub(super) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// An open connection's entry; dropping it takes the connection off the list.
pub(super) struct Registered {
    conns: Arc<Conns>,
    id: u64,
    conn: Arc<Conn>,
}

impl std::ops::Deref for Registered {
    type Target = Arc<Conn>;
    fn deref(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of a request arrived (HTTP/1.1): busy until its response is written.
    pub(super) fn read(&self) {
        self.lock().idle_since = None;
    }

    /// Bytes of a request were read (HTTP/1.1), the last of them ending with an empty
    /// line or not: busy until its response is written, and after that too if not.
    pub(super) fn read_bytes(&self, end_with_empty_line: bool) {
        let mut a = self.lock();
        a.idle_since = None;
        a.unparsed = !end_with_empty_line;
        // A response still being flushed does not make the connection idle: the
        // next request has begun.
        a.unflushed = false;
    }

    /// Idle from now: an HTTP/2 connection past its preface (its streams count, not
    /// the frames that keep it open).
    pub(super) fn idle_now(&self) {
        let mut a = self.lock();
        if a.in_flight == 0 {
            a.idle_since = Some(Instant::now());
        }
    }

    /// A request handed to the service; busy until the guard (kept with its response
    /// body) is dropped and the response flushed.
    pub(super) fn request(self: &Arc<Self>) -> InFlight {
        let mut a = self.lock();
        a.in_flight += 1;
        a.idle_since = None;
        a.unflushed = false;
        InFlight(self.clone())
    }

    /// The end of what [`Conn::request`] began: its response body dropped.
    pub(super) fn request_ended(&self) {
        let mut a = self.lock();
        a.in_flight = a.in_flight.saturating_sub(1);
        if a.in_flight == 0 {
            a.unflushed = true;
        }
    }

    /// Everything hyper had buffered is written to the socket.
    pub(super) fn flushed(&self) {
        let mut a = self.lock();
        if a.unflushed && a.in_flight == 0 && !a.unparsed {
            a.unflushed = false;
            a.idle_since = Some(Instant::now());
            drop(a);
            self.changed.notify_one();
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// A response body handed to hyper: waiting for its first piece to be taken.
    pub(super) fn body_began(&self) -> u64 {
        let mut a = self.lock();
        let id = a.next_body;
        a.next_body += 1;
        a.bodies.push((id, Instant::now()));
        drop(a);
        self.body_began.notify_one();
        id
    }

    /// hyper took a piece of body `id`: it waits for the next from now.
    pub(super) fn body_moved(&self, id: u64) {
        if let Some(b) = self.lock().bodies.iter_mut().find(|b| b.0 == id) {
            b.1 = Instant::now();
        }
    }

    pub(super) fn body_ended(&self, id: u64) {
        self.lock().bodies.retain(|b| b.0 != id);
    }

    /// Resolves once a response body has waited `wait` for hyper to take its next
    /// piece: its client took nothing for that long. Over HTTP/1.1 its socket is full
    /// (and [`Watched`] sees the write wait too); over HTTP/2 its client may read the
    /// socket and answer PINGs but leave the stream's or the connection's window shut,
    /// which nothing else sees. hyper offers no way to reset one stream from outside,
    /// so the connection is closed; the data plane's HTTP/2 server resets the stream
    /// (`server.body_idle_timeout`). Cancel-safe.
    pub(super) async fn stalled(&self, wait: Duration) {
        loop {
            let oldest = self.lock().bodies.iter().map(|b| b.1).min();
            match oldest {
                None => self.body_began.notified().await,
                Some(since) => {
                    let due = since + wait;
                    if Instant::now() >= due {
                        return;
                    }
                    tokio::time::sleep_until(due.into()).await;
                }
            }
        }
    }

    /// Chosen and closing, but a stream its HTTP/2 client opened just before the
    /// GOAWAY is still in flight: the listener need not wait for it, and chooses
    /// another (else a client that never reads that answer would stop every choice).
    pub(super) fn slow_to_close(&self) {
        self.lock().evicting = false;
        self.changed.notify_one();
    }

    /// Resolves when the listener chose this connection while it was idle: it is to
    /// close now. Chosen while busy again (a request began meanwhile), it declines
    /// and the listener chooses again. Cancel-safe.
    pub(super) async fn evicted(&self) {
        loop {
            self.evict.notified().await;
            {
                let mut a = self.lock();
                if a.idle_since.is_some() {
                    a.closing = true;
                    return;
                }
                a.evicting = false;
            }
            self.changed.notify_one();
        }
    }
}
