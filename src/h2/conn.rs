//! One HTTP/2 connection, driven by one task: frames are read and handled, each
//! request's handler future and then its response body are polled by the same task
//! (woken per stream through a waker of the stream's slot, see [`SlotWake`]), and
//! everything written — response heads, DATA, control frames — goes into one buffer
//! flushed once per pass. No task per stream, no locks between the connection and its
//! streams except the request body's, and only for requests that have a body.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

mod recv;
mod send;
mod skipped;

use super::body::{self, RecvBody};
use super::frame::{self, Head, Reason};
use super::head::{connection_specific, Decoded};
use super::hpack;
use crate::body::ProxyBody;
use crate::limits::ClientBody;

/// A request's handler: the gateway's whole request path, to the response head.
pub type Handler = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// What the server advertises and how it watches an idle peer.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    /// Without a frame from the client for this long, a PING is sent …
    pub keep_alive_interval: Duration,
    /// … and without its acknowledgement this long after, the connection is closed.
    pub keep_alive_timeout: Duration,
    /// `server.body_idle_timeout`: a stream whose response has waited this long for
    /// the client to open its flow-control window (a client that takes nothing more
    /// of it) is reset.
    pub body_idle_timeout: Option<Duration>,
    /// `server.header_read_timeout`: how long the connection may wait on the client
    /// for a request (see [`Waiting`]).
    pub header_timeout: Duration,
}

/// How long a connection has waited on its client, as its ticks (`header_timeout / 2`
/// apart) saw it. The connection waits when it has no stream open (an idle
/// connection), when the preface or the client's first SETTINGS has not come, or when
/// a header block is unfinished (a HEADERS frame not all read, CONTINUATION still to
/// come). Seen waiting at three ticks in a row with no stream opened in between, it
/// has waited at least `header_timeout` (at most 1.5 × that): an idle connection is
/// then sent GOAWAY and closed, as HTTP/1.1 keep-alive connections are after the same
/// time, and one stuck in its preface or a header block (a slowloris) is closed. No
/// clock is read per frame or per stream: the highest stream id says whether one
/// opened.
#[derive(Default)]
struct Waiting {
    ticks: u32,
    last_id: u32,
}

/// The receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE) and of the
/// connection: how much request body a client may send ahead of the upstream.
const STREAM_WINDOW: i64 = 1 << 20;
const CONN_WINDOW: i64 = 1 << 20;
/// Released bytes are given back in WINDOW_UPDATEs of at least this much.
const WINDOW_STEP: u32 = (STREAM_WINDOW / 4) as u32;
/// The HPACK table this server's decoder keeps (the default; not advertised).
const DECODER_TABLE: usize = 4096;
/// Unwritten output above which no more frames are read and no more body is polled:
/// a client that does not read cannot make the server buffer without bound.
const WRITE_HIGH: usize = 256 * 1024;
const READ_RESERVE: usize = frame::DEFAULT_MAX_FRAME + frame::HEAD_LEN;
/// A header block (HEADERS and CONTINUATIONs) beyond the advertised header list size
/// by this much is refused with ENHANCE_YOUR_CALM instead of buffered.
const BLOCK_SLACK: usize = 64 * 1024;
/// Frames that carry nothing (empty DATA without END_STREAM, empty CONTINUATIONs)
/// tolerated per connection before it is closed with ENHANCE_YOUR_CALM.
const MAX_EMPTY_FRAMES: u32 = 1000;
/// Streams the client may reset before their response more than it completes.
const MAX_EARLY_RESETS: u32 = 200;
/// Stream ids this server reset recently, whose late frames are ignored.
const RECENT_RESETS: usize = 128;
const PING_OPAQUE: [u8; 8] = *b"bulkhead";

/// The slots that want polling, filled by the slots' wakers from any thread.
#[derive(Default)]
struct Ready {
    inner: Mutex<ReadyInner>,
}

#[derive(Default)]
struct ReadyInner {
    slots: Vec<u32>,
    conn: Option<Waker>,
}

impl Ready {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The waker of one slot: queues the slot and wakes the connection's task. A slot
/// keeps its waker when it is reused, so a late wake meant for an earlier stream only
/// causes a poll that finds nothing to do.
struct SlotWake {
    idx: u32,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            let conn = {
                let mut r = self.ready.lock();
                r.slots.push(self.idx);
                r.conn.clone()
            };
            if let Some(w) = conn {
                w.wake();
            }
        }
    }
}

enum Phase {
    /// The request's handler, until it returns the response.
    Handler(Handler),
    /// The response body being sent.
    Body(ProxyBody),
    /// The response is over (or was never going to come: the slot is free).
    Done,
}

/// The request side of a stream.
enum Recv {
    /// The request has no body (END_STREAM on its HEADERS).
    Closed,
    /// A body: received through `shared`, counted against the windows until its
    /// consumer takes it (also after END_STREAM, `ended`).
    Open {
        shared: body::Shared,
        ended: bool,
        /// What the client may still send on this stream.
        window: i64,
        /// Bytes taken by the consumer, not yet given back in a WINDOW_UPDATE.
        released: u32,
        content_length: Option<u64>,
        received: u64,
    },
}

struct Slot {
    /// The stream; 0 when the slot is free.
    id: u32,
    wake: Arc<SlotWake>,
    waker: Waker,
    phase: Phase,
    recv: Recv,
    /// The response side: what the client lets this stream send.
    send_window: i64,
    /// Body bytes polled but not yet sent (flow control, frame size).
    pending: Bytes,
    trailers: Option<HeaderMap>,
    /// The body is over: once `pending` (and trailers) are sent, the stream ends.
    body_over: bool,
    /// Waiting for a WINDOW_UPDATE on this stream.
    stream_blocked: bool,
    /// Since when the response has waited for flow-control window (the stream's or
    /// the connection's) without sending anything.
    blocked_since: Option<tokio::time::Instant>,
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    bad_priority: bool,
    buf: Vec<u8>,
}

/// Why the connection ended early (logged at debug level by the caller).
#[derive(Debug)]
pub enum Ended {
    /// A connection error of ours: GOAWAY with this reason was sent.
    Protocol(Reason),
    Io(std::io::Error),
    /// The client did not answer a keep-alive PING.
    Timeout,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Protocol(r) => write!(f, "HTTP/2 connection error {r:?}"),
            Ended::Io(e) => write!(f, "{e}"),
            Ended::Timeout => f.write_str("the client did not answer a keep-alive PING"),
        }
    }
}

struct Conn<S> {
    service: S,
    max_concurrent: usize,
    max_header_list: usize,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    woff: usize,
    /// Written but not flushed (TLS).
    unflushed: bool,
    decoder: hpack::Decoder,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ids: HashMap<u32, u32, foldhash::fast::FixedState>,
    ready: Arc<Ready>,
    /// Slots to poll in this pass, besides those their wakers queued.
    local_ready: Vec<u32>,
    run_list: Vec<u32>,
    /// (slot, stream) waiting for the connection's send window.
    conn_blocked: Vec<(u32, u32)>,
    /// (slot, stream) waiting for the write buffer to drain.
    write_blocked: Vec<(u32, u32)>,
    preface: bool,
    settings_seen: bool,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// What this server has put in the client's HPACK table.
    encoder: hpack::Encoder,
    send_window: i64,
    recv_window: i64,
    recv_released: u32,
    last_id: u32,
    /// The ids below `last_id` that never opened.
    skipped: skipped::Skipped,
    block: Option<Block>,
    goaway_sent: bool,
    goaway_received: bool,
    /// A connection error: no more reading; finish writing and close.
    failed: Option<Reason>,
    eof: bool,
    recent_resets: VecDeque<u32>,
    early_resets: u32,
    completed: u32,
    empty_frames: u32,
    read_since_tick: bool,
    ping_outstanding: bool,
    /// `Config::body_idle_timeout`.
    body_idle: Option<Duration>,
    /// When the longest-blocked stream will have waited `body_idle`; the timer for it
    /// is made the first time a stream blocks.
    stall_deadline: Option<tokio::time::Instant>,
    stall_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Serves one HTTP/2 connection whose first bytes (the preface) are still to be read
/// from `io`, until the client closes it, an error ends it, or `shutdown` turns true
/// (then GOAWAY, and the streams already open finish).
pub async fn serve<I, S>(
    mut io: I,
    cfg: &Config,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<ClientBody>) -> Handler,
{
    let mut conn = Conn::new(service, cfg);
    // One timer for both watches (a second branch in the select cost ~100
    // instructions per wake of the connection, callgrind): the keep-alive PING's and
    // the client's wait (`Waiting`), each with its own next deadline.
    let start = tokio::time::Instant::now();
    let every = (cfg.header_timeout / 2).max(Duration::from_millis(1));
    let (mut keep_alive_due, mut waiting_due) = (start + cfg.keep_alive_interval, start);
    let mut tick = Box::pin(tokio::time::sleep_until(waiting_due));
    let mut waiting = Waiting::default();
    loop {
        let shutting = conn.goaway_sent || *shutdown.borrow();
        if shutting && !conn.goaway_sent {
            conn.go_away(Reason::NoError);
        }
        tokio::select! {
            biased;
            r = poll_fn(|cx| conn.poll(&mut io, cx)) => {
                let r = match r {
                    Ok(()) => conn.failed.map_or(Ok(()), |r| Err(Ended::Protocol(r))),
                    Err(e) => Err(Ended::Io(e)),
                };
                conn.cancel_all();
                let _ = poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await;
                return r;
            }
            r = shutdown.changed(), if !shutting => {
                if r.is_err() {
                    // The server is gone without saying so: finish as on shutdown.
                    conn.go_away(Reason::NoError);
                }
            }
            _ = &mut tick => {
                let now = tokio::time::Instant::now();
                if now >= waiting_due {
                    waiting_due = now + every;
                    if shutting || !conn.waiting() {
                        waiting.ticks = 0;
                    } else if waiting.ticks > 0 && waiting.last_id == conn.last_id {
                        waiting.ticks += 1;
                    } else {
                        waiting = Waiting { ticks: 1, last_id: conn.last_id };
                    }
                    if waiting.ticks >= 3 {
                        if conn.idle() {
                            tracing::debug!("closing an idle HTTP/2 connection");
                            conn.go_away(Reason::NoError);
                        } else {
                            tracing::debug!("closing an HTTP/2 connection whose client sent no whole request in time");
                            conn.cancel_all();
                            return Err(Ended::Timeout);
                        }
                    }
                }
                if now >= keep_alive_due {
                    keep_alive_due = now + if conn.ping_outstanding {
                        conn.cancel_all();
                        return Err(Ended::Timeout);
                    } else if std::mem::take(&mut conn.read_since_tick) {
                        cfg.keep_alive_interval
                    } else {
                        frame::write_ping(&mut conn.wbuf, false, &PING_OPAQUE);
                        conn.ping_outstanding = true;
                        cfg.keep_alive_timeout
                    };
                }
                tick.as_mut().reset(keep_alive_due.min(waiting_due));
            }
        }
    }
}

impl<S: FnMut(Request<ClientBody>) -> Handler> Conn<S> {
    fn new(service: S, cfg: &Config) -> Conn<S> {
        let mut wbuf = Vec::with_capacity(4096);
        frame::write_settings(
            &mut wbuf,
            &[
                (
                    frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                    cfg.max_concurrent_streams,
                ),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    cfg.max_header_list_size,
                ),
            ],
        );
        frame::write_window_update(&mut wbuf, 0, (CONN_WINDOW - 65_535) as u32);
        Conn {
            service,
            max_concurrent: cfg.max_concurrent_streams as usize,
            max_header_list: cfg.max_header_list_size as usize,
            rbuf: BytesMut::new(),
            wbuf,
            woff: 0,
            unflushed: false,
            decoder: hpack::Decoder::new(DECODER_TABLE),
            slots: Vec::new(),
            free: Vec::new(),
            ids: HashMap::default(),
            ready: Arc::default(),
            local_ready: Vec::new(),
            run_list: Vec::new(),
            conn_blocked: Vec::new(),
            write_blocked: Vec::new(),
            preface: false,
            settings_seen: false,
            peer_initial_window: 65_535,
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            encoder: hpack::Encoder::default(),
            send_window: 65_535,
            recv_window: CONN_WINDOW,
            recv_released: 0,
            last_id: 0,
            skipped: skipped::Skipped::default(),
            block: None,
            goaway_sent: false,
            goaway_received: false,
            failed: None,
            eof: false,
            recent_resets: VecDeque::new(),
            early_resets: 0,
            completed: 0,
            empty_frames: 0,
            read_since_tick: false,
            ping_outstanding: false,
            body_idle: cfg.body_idle_timeout,
            stall_deadline: None,
            stall_timer: None,
        }
    }

    fn unwritten(&self) -> usize {
        self.wbuf.len() - self.woff
    }

    /// One pass: read and handle frames, poll the streams that are ready, write.
    fn poll<I: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        {
            let mut r = self.ready.lock();
            if !r.conn.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                r.conn = Some(cx.waker().clone());
            }
        }
        for _ in 0..64 {
            let mut progress = false;
            if self.failed.is_none() && !self.eof && self.unwritten() < WRITE_HIGH {
                match self.read(io, cx) {
                    Ok(read) => progress |= read,
                    Err(reason) => self.fail(reason),
                }
            }
            if self.eof && self.failed.is_none() {
                // The client closed its side: nobody is left to answer.
                self.cancel_all();
            }
            progress |= self.run();
            progress |= self.reset_stalled(cx);
            if let Poll::Ready(Err(e)) = self.flush(io, cx) {
                return Poll::Ready(Err(e));
            }
            progress |= self.unblock_writes();
            if self.finished() {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Enough for one turn: let the runtime's other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A response waiting for flow-control window starts its stall clock (the first
    /// time only: a stream that keeps waiting keeps its start).
    fn blocked(&mut self, idx: u32) {
        let Some(idle) = self.body_idle else {
            return;
        };
        let slot = &mut self.slots[idx as usize];
        if slot.blocked_since.is_none() {
            let now = tokio::time::Instant::now();
            slot.blocked_since = Some(now);
            let due = now + idle;
            if self.stall_deadline.is_none_or(|d| due < d) {
                self.stall_deadline = Some(due);
            }
        }
    }

    /// Resets the streams whose responses have waited `body_idle` for the client to
    /// open its window — a client that takes nothing more would otherwise hold them,
    /// their upstream exchanges and in-flight slots, for as long as the connection
    /// lives. `true` when it reset any.
    fn reset_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(due), Some(idle)) = (self.stall_deadline, self.body_idle) else {
            return false;
        };
        let timer = match &mut self.stall_timer {
            Some(t) => {
                if t.deadline() != due {
                    t.as_mut().reset(due);
                }
                t
            }
            None => self
                .stall_timer
                .insert(Box::pin(tokio::time::sleep_until(due))),
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = tokio::time::Instant::now();
        let mut next: Option<tokio::time::Instant> = None;
        let mut any = false;
        for idx in 0..self.slots.len() as u32 {
            let slot = &self.slots[idx as usize];
            let Some(since) = slot.blocked_since.filter(|_| slot.id != 0) else {
                continue;
            };
            if now.saturating_duration_since(since) >= idle {
                tracing::debug!(
                    stream = slot.id,
                    ?idle,
                    "resetting a stream whose client took nothing of its response (server.body_idle_timeout)"
                );
                self.free_slot(idx, Some(Reason::Cancel));
                any = true;
            } else {
                let due = since + idle;
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        self.stall_deadline = next;
        // Polled again (re-armed) in the same pass when there is a next deadline.
        any || next.is_some()
    }

    /// Whether the connection waits on its client (see [`Waiting`]).
    fn waiting(&self) -> bool {
        let partial_head = self.rbuf.len() >= frame::HEAD_LEN
            && matches!(
                Head::parse(&self.rbuf[..frame::HEAD_LEN]).kind,
                frame::HEADERS | frame::CONTINUATION
            );
        self.ids.is_empty() || !self.settings_seen || self.block.is_some() || partial_head
    }

    /// No stream open and nothing of one begun: closing loses nothing.
    fn idle(&self) -> bool {
        self.ids.is_empty() && self.settings_seen && self.block.is_none() && self.rbuf.is_empty()
    }

    fn finished(&self) -> bool {
        self.unwritten() == 0
            && !self.unflushed
            && (self.failed.is_some()
                || self.eof
                || ((self.goaway_sent || self.goaway_received) && self.ids.is_empty()))
    }

    fn alloc_slot(&mut self, stream: u32) -> u32 {
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                let idx = self.slots.len() as u32;
                let wake = Arc::new(SlotWake {
                    idx,
                    queued: AtomicBool::new(false),
                    ready: self.ready.clone(),
                });
                self.slots.push(Slot {
                    id: 0,
                    waker: Waker::from(wake.clone()),
                    wake,
                    phase: Phase::Done,
                    recv: Recv::Closed,
                    send_window: 0,
                    pending: Bytes::new(),
                    trailers: None,
                    body_over: false,
                    stream_blocked: false,
                    blocked_since: None,
                });
                idx
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.id = stream;
        slot.body_over = false;
        slot.stream_blocked = false;
        slot.blocked_since = None;
        self.ids.insert(stream, idx);
        idx
    }

    /// Frees a slot, dropping its handler or body; `rst` is sent to the client when
    /// given (the client's own RST_STREAM needs no answer).
    fn free_slot(&mut self, idx: u32, rst: Option<Reason>) {
        let slot = &mut self.slots[idx as usize];
        let stream = std::mem::replace(&mut slot.id, 0);
        if stream == 0 {
            return;
        }
        self.ids.remove(&stream);
        if let (Phase::Body(body), false) = (&mut slot.phase, slot.pending.is_empty()) {
            // Cut off with bytes taken from the upstream that never went out.
            body.cut_off(slot.pending.len());
        }
        slot.phase = Phase::Done;
        slot.pending = Bytes::new();
        slot.trailers = None;
        slot.body_over = false;
        slot.stream_blocked = false;
        slot.blocked_since = None;
        let mut give_back = 0u32;
        if let Recv::Open { shared, .. } = std::mem::replace(&mut slot.recv, Recv::Closed) {
            // What the consumer took or never will, back to the connection's window
            // (the stream's own is moot now).
            let mut s = body::lock(&shared);
            s.reset = true;
            s.conn = None;
            give_back += std::mem::take(&mut s.released);
            give_back += s.chunks.iter().map(|c| c.len() as u32).sum::<u32>();
            s.chunks.clear();
            if let Some(w) = s.consumer.take() {
                w.wake();
            }
        }
        self.free.push(idx);
        self.release(give_back);
        if let Some(r) = rst {
            frame::write_rst(&mut self.wbuf, stream, r);
            self.remember_reset(stream);
        }
    }

    fn remember_reset(&mut self, stream: u32) {
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(stream);
    }

    /// A stream error: RST_STREAM, and the stream's work is dropped.
    fn stream_error(&mut self, stream: u32, reason: Reason) {
        match self.ids.get(&stream) {
            Some(&idx) => self.free_slot(idx, Some(reason)),
            None => {
                frame::write_rst(&mut self.wbuf, stream, reason);
                self.remember_reset(stream);
            }
        }
    }

    /// Polls the slots that are ready; `true` if there were any.
    fn run(&mut self) -> bool {
        let mut list = std::mem::take(&mut self.run_list);
        list.clear();
        list.append(&mut self.local_ready);
        list.append(&mut self.ready.lock().slots);
        if list.is_empty() {
            self.run_list = list;
            return false;
        }
        for &idx in &list {
            self.poll_slot(idx);
        }
        self.run_list = list;
        true
    }

    fn poll_slot(&mut self, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        slot.wake.queued.store(false, Ordering::Release);
        if slot.id == 0 {
            return;
        }
        let stream = slot.id;
        if let Phase::Handler(handler) = &mut slot.phase {
            let mut cx = Context::from_waker(&slot.waker);
            if let Poll::Ready(resp) = handler.as_mut().poll(&mut cx) {
                let (parts, body) = resp.into_parts();
                let size = body.size_hint().exact();
                let end = body.is_end_stream();
                slot.phase = if end { Phase::Done } else { Phase::Body(body) };
                self.write_response_head(stream, &parts, size, end);
                if end {
                    self.send_done(idx);
                    return;
                }
            }
        }
        self.take_released(idx);
        self.send_body(idx);
    }

    /// Gives back what the consumer of a request body has taken.
    fn take_released(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        let Recv::Open {
            shared,
            ended,
            window,
            released,
            ..
        } = &mut slot.recv
        else {
            return;
        };
        let taken = std::mem::take(&mut body::lock(shared).released);
        if taken == 0 && *released < WINDOW_STEP {
            return;
        }
        *released += taken;
        let stream = slot.id;
        let mut update = 0;
        if !*ended && *released >= WINDOW_STEP {
            update = std::mem::take(released);
            *window += i64::from(update);
        }
        self.release(taken);
        if update > 0 {
            frame::write_window_update(&mut self.wbuf, stream, update);
        }
    }

    fn go_away(&mut self, reason: Reason) {
        if !self.goaway_sent {
            frame::write_goaway(&mut self.wbuf, self.last_id, reason);
            self.goaway_sent = true;
        }
    }

    /// A connection error: GOAWAY, every stream dropped, then close.
    fn fail(&mut self, reason: Reason) {
        tracing::debug!(?reason, "HTTP/2 connection error");
        // A GOAWAY sent earlier (shutdown) said NO_ERROR; this one says why.
        self.goaway_sent = false;
        self.go_away(reason);
        self.failed = Some(reason);
        self.cancel_all();
    }

    fn cancel_all(&mut self) {
        for idx in 0..self.slots.len() as u32 {
            if self.slots[idx as usize].id != 0 {
                self.free_slot(idx, None);
            }
        }
    }
}
