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
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::body::ProxyBody;

/// The admin listener's open connections.
pub(super) struct Conns {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// A connection went idle, or declined to close: the listener, waiting for a
    /// slot, may choose (again).
    changed: Arc<Notify>,
}

/// The most of a response body handed to hyper at a time. hyper's HTTP/2 server takes
/// a body's next frame before it waits for flow-control window, and hands it to the
/// `h2` crate whole once the window holds a byte: `/metrics` of a large config (9 MB,
/// one frame) was handed over at once and buffered for a client that never opens its
/// window, out of sight here (the body taken, the connection looked idle), or waited in
/// hyper for a window of 0. In pieces, what waits beyond the client's window is one
/// piece, and each piece taken is progress that [`Conn::stalled`] sees. The size of an
/// HTTP/2 frame's payload unless the client allows more.
const PIECE: usize = 16 * 1024;

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
    fn read_bytes(&self, end_with_empty_line: bool) {
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

    /// Everything hyper had buffered is written to the socket.
    fn flushed(&self) {
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
    fn body_began(&self) -> u64 {
        let mut a = self.lock();
        let id = a.next_body;
        a.next_body += 1;
        a.bodies.push((id, Instant::now()));
        drop(a);
        self.body_began.notify_one();
        id
    }

    /// hyper took a piece of body `id`: it waits for the next from now.
    fn body_moved(&self, id: u64) {
        if let Some(b) = self.lock().bodies.iter_mut().find(|b| b.0 == id) {
            b.1 = Instant::now();
        }
    }

    fn body_ended(&self, id: u64) {
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

/// A request in progress, until its response body is dropped: by hyper once it has
/// taken the whole body (or at once for `HEAD`), or when the connection ends.
pub(super) struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.lock();
        a.in_flight = a.in_flight.saturating_sub(1);
        if a.in_flight == 0 {
            a.unflushed = true;
        }
    }
}

/// An admin response's body, holding its request's [`InFlight`]: handed to hyper in
/// pieces of at most [`PIECE`], each taken reported to the connection. Admin answers
/// are whole in memory, so a piece is never waited for here: the time between two is
/// the client's (or the connection's) to take.
pub(super) struct Tracked {
    body: ProxyBody,
    /// What is left of a data frame of `body` larger than a piece.
    rest: Bytes,
    /// This body among the connection's ([`Conn::stalled`]).
    id: u64,
    in_flight: InFlight,
}

impl Tracked {
    pub(super) fn new(body: ProxyBody, in_flight: InFlight) -> Tracked {
        let id = in_flight.0.body_began();
        Tracked {
            body,
            rest: Bytes::new(),
            id,
            in_flight,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.in_flight.0.body_ended(self.id);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = if this.rest.is_empty() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        if data.len() > PIECE {
                            this.rest = data.split_off(PIECE);
                        }
                        Frame::data(data)
                    }
                    Err(frame) => frame,
                },
                other => return other,
            }
        } else {
            Frame::data(this.rest.split_to(PIECE.min(this.rest.len())))
        };
        this.in_flight.0.body_moved(this.id);
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let (inner, rest) = (self.body.size_hint(), self.rest.len() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// A connection's socket, reporting what it sees to its [`Conn`]: bytes read (the
/// start of a request, over HTTP/1.1) and flushes (a response written whole). The
/// listener bounds its writes with [`crate::server::Stalls`]
/// (`header_read_timeout`): without that, a client that asks for a large answer
/// (`/metrics` of a large config) and never reads it holds its slot for good: in the
/// middle of a response, it is never the one closed to make room.
///
/// Bytes of a pipelined request that hyper read together with the request before it
/// sit in hyper's buffer, unseen here: a connection whose reads do not end with an
/// empty line is not taken for idle after its answer ([`Activity`]'s `unparsed`). A
/// whole pipelined head hyper parses at once, in the same poll that wrote the answer
/// before it (or, every 16 requests, the next, which polls the connection before
/// [`Conn::evicted`]), so it is a request before the choice is looked at.
pub(super) struct Watched<S> {
    io: S,
    conn: Arc<Conn>,
    /// Whether bytes read start a request: HTTP/1.1. Over HTTP/2 they are as often
    /// the client's PING answers and window updates; its streams count instead.
    reads_are_requests: bool,
    /// The last three bytes read (HTTP/1.1), to tell whether they end with an empty
    /// line; as if one had ended before the first.
    tail: [u8; 3],
}

impl<S> Watched<S> {
    pub(super) fn new(io: S, conn: Arc<Conn>, reads_are_requests: bool) -> Watched<S> {
        Watched {
            io,
            conn,
            reads_are_requests,
            tail: *b"\n\r\n",
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if this.reads_are_requests && !new.is_empty() {
            for &b in new.iter().rev().take(3).rev() {
                this.tail = [this.tail[1], this.tail[2], b];
            }
            this.conn
                .read_bytes(this.tail == *b"\n\r\n" || this.tail[1..] == *b"\n\n");
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// hyper flushes once its write buffer is in the socket: the response written
    /// so far is out of its hands.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.conn.flushed();
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
