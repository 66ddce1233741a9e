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

use bytes::{Buf, Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::body::{self, RecvBody};
use super::frame::{self, Head, Reason};
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
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    bad_priority: bool,
    buf: Vec<u8>,
}

/// The fields of a request head, as decoded.
#[derive(Default)]
struct Decoded {
    method: Option<Method>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    headers: HeaderMap,
    /// Any pseudo-header at all (trailers must have none).
    pseudo: bool,
    regular_seen: bool,
    malformed: bool,
    size: usize,
    limit: usize,
}

impl Decoded {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.malformed || self.size > self.limit {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            self.pseudo = true;
            let slot = match pseudo {
                b"method" => {
                    if self.method.is_some() {
                        self.malformed = true;
                    }
                    match Method::from_bytes(value) {
                        Ok(m) => self.method = Some(m),
                        Err(_) => self.malformed = true,
                    }
                    return;
                }
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                _ => {
                    self.malformed = true;
                    return;
                }
            };
            if self.regular_seen || slot.is_some() {
                self.malformed = true;
                return;
            }
            *slot = Some(Bytes::copy_from_slice(value));
            return;
        }
        self.regular_seen = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            self.malformed = true;
            return;
        }
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            self.malformed = true;
            return;
        };
        if connection_specific(&name) || (name == header::TE && value != "trailers") {
            self.malformed = true;
            return;
        }
        if name == header::COOKIE {
            // RFC 9113 §8.2.3: split cookies are joined for an HTTP/1.1 upstream.
            if let Some(old) = self.headers.get_mut(header::COOKIE) {
                let mut joined = Vec::with_capacity(old.len() + 2 + value.len());
                joined.extend_from_slice(old.as_bytes());
                joined.extend_from_slice(b"; ");
                joined.extend_from_slice(value.as_bytes());
                match HeaderValue::from_bytes(&joined) {
                    Ok(v) => *old = v,
                    Err(_) => self.malformed = true,
                }
                return;
            }
        }
        self.headers.append(name, value);
    }

    /// The request's URI; `None` when the head is malformed.
    fn uri(&mut self) -> Option<Uri> {
        let method = self.method.as_ref()?;
        let mut parts = http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            parts.authority = Some(Authority::from_maybe_shared(self.authority.take()?).ok()?);
            return Uri::from_parts(parts).ok();
        }
        let (scheme, path) = (self.scheme.take()?, self.path.take()?);
        if path.is_empty() {
            return None;
        }
        if let Some(a) = self.authority.take() {
            parts.scheme = Some(match &scheme[..] {
                b"http" => Scheme::HTTP,
                b"https" => Scheme::HTTPS,
                other => Scheme::try_from(other).ok()?,
            });
            parts.authority = Some(Authority::from_maybe_shared(a).ok()?);
        }
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(path).ok()?);
        Uri::from_parts(parts).ok()
    }
}

fn connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
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
    /// The HPACK table size the client's decoder last allowed, and a size update owed
    /// at the start of the next header block after it shrank.
    encoder_table: usize,
    size_update: Option<usize>,
    send_window: i64,
    recv_window: i64,
    recv_released: u32,
    last_id: u32,
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
    let mut tick = Box::pin(tokio::time::sleep(cfg.keep_alive_interval));
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
                let next = if conn.ping_outstanding {
                    conn.cancel_all();
                    return Err(Ended::Timeout);
                } else if std::mem::take(&mut conn.read_since_tick) {
                    cfg.keep_alive_interval
                } else {
                    frame::write_ping(&mut conn.wbuf, false, &PING_OPAQUE);
                    conn.ping_outstanding = true;
                    cfg.keep_alive_timeout
                };
                tick.as_mut().reset(tokio::time::Instant::now() + next);
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
            encoder_table: 4096,
            size_update: None,
            send_window: 65_535,
            recv_window: CONN_WINDOW,
            recv_released: 0,
            last_id: 0,
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

    fn finished(&self) -> bool {
        self.unwritten() == 0
            && !self.unflushed
            && (self.failed.is_some()
                || self.eof
                || ((self.goaway_sent || self.goaway_received) && self.ids.is_empty()))
    }

    /// Reads what the socket has and handles every complete frame; `Ok(true)` if
    /// anything was read.
    fn read<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Result<bool, Reason> {
        let mut any = false;
        loop {
            while self.next_frame()? {
                any = true;
                if self.failed.is_some() || self.unwritten() >= WRITE_HIGH {
                    return Ok(true);
                }
            }
            self.rbuf.reserve(READ_RESERVE);
            let before = self.rbuf.len();
            let polled = {
                let fut = tokio::io::AsyncReadExt::read_buf(io, &mut self.rbuf);
                tokio::pin!(fut);
                fut.poll(cx)
            };
            match polled {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    return Ok(true);
                }
                Poll::Ready(Ok(_)) => {
                    debug_assert!(self.rbuf.len() > before);
                    self.read_since_tick = true;
                    any = true;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/2 connection read failed");
                    self.eof = true;
                    return Ok(true);
                }
                Poll::Pending => return Ok(any),
            }
        }
    }

    /// Handles the next frame if the buffer holds all of it.
    fn next_frame(&mut self) -> Result<bool, Reason> {
        if !self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                if !frame::PREFACE.starts_with(&self.rbuf) {
                    return Err(Reason::Protocol);
                }
                return Ok(false);
            }
            if self.rbuf[..frame::PREFACE.len()] != frame::PREFACE[..] {
                return Err(Reason::Protocol);
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = true;
        }
        if self.rbuf.len() < frame::HEAD_LEN {
            return Ok(false);
        }
        let head = Head::parse(&self.rbuf[..frame::HEAD_LEN]);
        if head.len > frame::DEFAULT_MAX_FRAME {
            return Err(Reason::FrameSize);
        }
        if self.rbuf.len() < frame::HEAD_LEN + head.len {
            return Ok(false);
        }
        self.rbuf.advance(frame::HEAD_LEN);
        let payload = self.rbuf.split_to(head.len);
        self.frame(head, payload)?;
        Ok(true)
    }

    fn frame(&mut self, h: Head, p: BytesMut) -> Result<(), Reason> {
        if let Some(block) = &self.block {
            if h.kind != frame::CONTINUATION || h.stream != block.stream {
                return Err(Reason::Protocol);
            }
        }
        if !self.settings_seen && (h.kind != frame::SETTINGS || h.flags & frame::ACK != 0) {
            // The client's preface ends with a SETTINGS frame.
            return Err(Reason::Protocol);
        }
        match h.kind {
            frame::DATA => self.on_data(h, p),
            frame::HEADERS => self.on_headers(h, &p),
            frame::PRIORITY => {
                if h.stream == 0 {
                    return Err(Reason::Protocol);
                }
                if h.len != 5 {
                    self.stream_error(h.stream, Reason::FrameSize);
                } else if u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff == h.stream {
                    self.stream_error(h.stream, Reason::Protocol);
                }
                Ok(())
            }
            frame::RST_STREAM => {
                if h.stream == 0 {
                    return Err(Reason::Protocol);
                }
                if h.len != 4 {
                    return Err(Reason::FrameSize);
                }
                if h.stream > self.last_id {
                    return Err(Reason::Protocol);
                }
                self.on_reset(h.stream)
            }
            frame::SETTINGS => self.on_settings(h, &p),
            frame::PUSH_PROMISE => Err(Reason::Protocol),
            frame::PING => {
                if h.stream != 0 {
                    return Err(Reason::Protocol);
                }
                if h.len != 8 {
                    return Err(Reason::FrameSize);
                }
                if h.flags & frame::ACK != 0 {
                    self.ping_outstanding = false;
                } else {
                    let mut opaque = [0u8; 8];
                    opaque.copy_from_slice(&p);
                    frame::write_ping(&mut self.wbuf, true, &opaque);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if h.stream != 0 {
                    return Err(Reason::Protocol);
                }
                if h.len < 8 {
                    return Err(Reason::FrameSize);
                }
                self.goaway_received = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.on_window_update(h, &p),
            frame::CONTINUATION => {
                let Some(mut block) = self.block.take() else {
                    return Err(Reason::Protocol);
                };
                if p.is_empty() && h.flags & frame::END_HEADERS == 0 {
                    self.empty_frame()?;
                }
                if block.buf.len() + p.len() > self.max_header_list + BLOCK_SLACK {
                    return Err(Reason::EnhanceYourCalm);
                }
                block.buf.extend_from_slice(&p);
                if h.flags & frame::END_HEADERS != 0 {
                    let r = self.on_block(
                        block.stream,
                        block.end_stream,
                        block.bad_priority,
                        &block.buf,
                    );
                    block.buf.clear();
                    r
                } else {
                    self.block = Some(block);
                    Ok(())
                }
            }
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn empty_frame(&mut self) -> Result<(), Reason> {
        self.empty_frames += 1;
        if self.empty_frames > MAX_EMPTY_FRAMES {
            return Err(Reason::EnhanceYourCalm);
        }
        Ok(())
    }

    fn on_settings(&mut self, h: Head, p: &[u8]) -> Result<(), Reason> {
        if h.stream != 0 {
            return Err(Reason::Protocol);
        }
        if h.flags & frame::ACK != 0 {
            return if h.len == 0 {
                Ok(())
            } else {
                Err(Reason::FrameSize)
            };
        }
        if h.len % 6 != 0 {
            return Err(Reason::FrameSize);
        }
        for s in p.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => {
                    let v = v as usize;
                    if v < self.encoder_table {
                        self.encoder_table = v;
                        self.size_update = Some(v);
                    }
                }
                frame::SETTINGS_ENABLE_PUSH if v > 1 => return Err(Reason::Protocol),
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let v = i64::from(v);
                    if v > frame::MAX_WINDOW {
                        return Err(Reason::FlowControl);
                    }
                    let delta = v - self.peer_initial_window;
                    self.peer_initial_window = v;
                    for (idx, slot) in self.slots.iter_mut().enumerate() {
                        if slot.id == 0 {
                            continue;
                        }
                        slot.send_window += delta;
                        if slot.send_window > frame::MAX_WINDOW {
                            return Err(Reason::FlowControl);
                        }
                        if delta > 0 && std::mem::take(&mut slot.stream_blocked) {
                            self.local_ready.push(idx as u32);
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME as u32..=0xff_ffff).contains(&v) {
                        return Err(Reason::Protocol);
                    }
                    self.peer_max_frame = v as usize;
                }
                _ => {}
            }
        }
        self.settings_seen = true;
        frame::write_settings_ack(&mut self.wbuf);
        Ok(())
    }

    fn on_window_update(&mut self, h: Head, p: &[u8]) -> Result<(), Reason> {
        if h.len != 4 {
            return Err(Reason::FrameSize);
        }
        let inc = i64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff);
        if h.stream == 0 {
            if inc == 0 {
                return Err(Reason::Protocol);
            }
            self.send_window += inc;
            if self.send_window > frame::MAX_WINDOW {
                return Err(Reason::FlowControl);
            }
            for (idx, id) in self.conn_blocked.drain(..) {
                if self.slots[idx as usize].id == id {
                    self.local_ready.push(idx);
                }
            }
            return Ok(());
        }
        if h.stream > self.last_id {
            return Err(Reason::Protocol);
        }
        let Some(&idx) = self.ids.get(&h.stream) else {
            return Ok(());
        };
        if inc == 0 {
            self.stream_error(h.stream, Reason::Protocol);
            return Ok(());
        }
        let slot = &mut self.slots[idx as usize];
        slot.send_window += inc;
        if slot.send_window > frame::MAX_WINDOW {
            self.stream_error(h.stream, Reason::FlowControl);
            return Ok(());
        }
        if std::mem::take(&mut slot.stream_blocked) {
            self.local_ready.push(idx);
        }
        Ok(())
    }

    fn on_reset(&mut self, stream: u32) -> Result<(), Reason> {
        let Some(&idx) = self.ids.get(&stream) else {
            return Ok(());
        };
        if !matches!(self.slots[idx as usize].phase, Phase::Done) {
            self.early_resets += 1;
            if self.early_resets > MAX_EARLY_RESETS.saturating_add(self.completed) {
                return Err(Reason::EnhanceYourCalm);
            }
        }
        self.free_slot(idx, None);
        Ok(())
    }

    fn on_headers(&mut self, h: Head, p: &[u8]) -> Result<(), Reason> {
        if h.stream == 0 || h.stream % 2 == 0 {
            return Err(Reason::Protocol);
        }
        let mut data = frame::unpad(h.flags, p).ok_or(Reason::Protocol)?;
        let mut bad_priority = false;
        if h.flags & frame::PRIORITY_FLAG != 0 {
            if data.len() < 5 {
                return Err(Reason::FrameSize);
            }
            let dep = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) & 0x7fff_ffff;
            bad_priority = dep == h.stream;
            data = &data[5..];
        }
        let end_stream = h.flags & frame::END_STREAM != 0;
        if h.flags & frame::END_HEADERS != 0 {
            return self.on_block(h.stream, end_stream, bad_priority, data);
        }
        if data.is_empty() {
            self.empty_frame()?;
        }
        self.block = Some(Block {
            stream: h.stream,
            end_stream,
            bad_priority,
            buf: data.to_vec(),
        });
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    fn on_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        bad_priority: bool,
        block: &[u8],
    ) -> Result<(), Reason> {
        let mut d = Decoded {
            limit: self.max_header_list,
            ..Decoded::default()
        };
        // Decoded in full whatever becomes of the stream: the HPACK table is the
        // connection's.
        self.decoder
            .decode(block, |n, v| d.field(n, v))
            .map_err(|_| Reason::Compression)?;
        if let Some(&idx) = self.ids.get(&stream) {
            return self.on_trailers(idx, end_stream, d);
        }
        if stream <= self.last_id {
            if self.recent_resets.contains(&stream) {
                return Ok(());
            }
            return Err(Reason::StreamClosed);
        }
        self.last_id = stream;
        if self.goaway_sent {
            return Ok(());
        }
        if bad_priority {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        }
        if self.ids.len() >= self.max_concurrent {
            self.stream_error(stream, Reason::RefusedStream);
            return Ok(());
        }
        if d.size > self.max_header_list {
            self.refuse_too_large(stream, end_stream);
            return Ok(());
        }
        let uri = if d.malformed { None } else { d.uri() };
        let content_length = match d.headers.get(header::CONTENT_LENGTH) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .map(Some)
                .ok_or(()),
        };
        let (Some(uri), Ok(content_length)) = (uri, content_length) else {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        };
        if end_stream && content_length.is_some_and(|n| n != 0) {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        }
        let (body, recv) = if end_stream {
            (ClientBody::Empty, Recv::Closed)
        } else {
            let shared = body::Shared::default();
            (
                ClientBody::H2(RecvBody::new(shared.clone(), content_length)),
                Recv::Open {
                    shared,
                    ended: false,
                    window: STREAM_WINDOW,
                    released: 0,
                    content_length,
                    received: 0,
                },
            )
        };
        let mut req = Request::new(body);
        *req.method_mut() = d.method.take().unwrap_or_default();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = d.headers;
        let handler = (self.service)(req);
        let idx = self.alloc_slot(stream);
        let slot = &mut self.slots[idx as usize];
        if let Recv::Open { shared, .. } = &recv {
            body::lock(shared).conn = Some(slot.waker.clone());
        }
        slot.phase = Phase::Handler(handler);
        slot.recv = recv;
        slot.send_window = self.peer_initial_window;
        self.local_ready.push(idx);
        Ok(())
    }

    fn on_trailers(&mut self, idx: u32, end_stream: bool, d: Decoded) -> Result<(), Reason> {
        let slot = &mut self.slots[idx as usize];
        let stream = slot.id;
        let Recv::Open {
            shared,
            ended: false,
            content_length,
            received,
            ..
        } = &slot.recv
        else {
            self.stream_error(stream, Reason::StreamClosed);
            return Ok(());
        };
        if !end_stream || d.pseudo || d.malformed || content_length.is_some_and(|n| n != *received)
        {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        }
        {
            let mut s = body::lock(shared);
            if !d.headers.is_empty() {
                s.trailers = Some(d.headers);
            }
            s.end = true;
            if let Some(w) = s.consumer.take() {
                w.wake();
            }
        }
        self.recv_closed(idx);
        Ok(())
    }

    fn on_data(&mut self, h: Head, p: BytesMut) -> Result<(), Reason> {
        if h.stream == 0 {
            return Err(Reason::Protocol);
        }
        let flow = h.len as i64;
        self.recv_window -= flow;
        if self.recv_window < 0 {
            return Err(Reason::FlowControl);
        }
        let data_len = frame::unpad(h.flags, &p).ok_or(Reason::Protocol)?.len();
        let start = if h.flags & frame::PADDED != 0 { 1 } else { 0 };
        let end_stream = h.flags & frame::END_STREAM != 0;
        if data_len == 0 && !end_stream {
            self.empty_frame()?;
        }
        let Some(&idx) = self.ids.get(&h.stream) else {
            self.release(h.len as u32);
            if h.stream > self.last_id {
                return Err(Reason::Protocol);
            }
            if !self.recent_resets.contains(&h.stream) {
                self.stream_error(h.stream, Reason::StreamClosed);
            }
            return Ok(());
        };
        // The padding is given back at once.
        let padding = (h.len - data_len) as u32;
        self.release(padding);
        let slot = &mut self.slots[idx as usize];
        let Recv::Open {
            shared,
            ended: false,
            window,
            released,
            content_length,
            received,
        } = &mut slot.recv
        else {
            self.release(data_len as u32);
            self.stream_error(h.stream, Reason::StreamClosed);
            return Ok(());
        };
        *window -= flow;
        *released += padding;
        *received += data_len as u64;
        if *window < 0 {
            self.release(data_len as u32);
            self.stream_error(h.stream, Reason::FlowControl);
            return Ok(());
        }
        if content_length.is_some_and(|n| *received > n || (end_stream && *received != n)) {
            self.release(data_len as u32);
            self.stream_error(h.stream, Reason::Protocol);
            return Ok(());
        }
        let dropped = {
            let mut s = body::lock(shared);
            if s.dropped {
                true
            } else {
                if data_len > 0 {
                    s.chunks
                        .push_back(p.freeze().slice(start..start + data_len));
                }
                s.end = end_stream;
                if let Some(w) = s.consumer.take() {
                    w.wake();
                }
                false
            }
        };
        if dropped {
            // Nobody reads this body any more: its bytes are given back at once.
            *released += data_len as u32;
            self.release(data_len as u32);
        }
        if end_stream {
            self.recv_closed(idx);
        } else if dropped {
            self.local_ready.push(idx);
        }
        Ok(())
    }

    /// Gives received bytes back to the connection's window.
    fn release(&mut self, n: u32) {
        self.recv_released += n;
        if self.recv_released >= WINDOW_STEP {
            frame::write_window_update(&mut self.wbuf, 0, self.recv_released);
            self.recv_window += i64::from(self.recv_released);
            self.recv_released = 0;
        }
    }

    /// END_STREAM received on a stream (whose response is still to finish: a finished
    /// one frees the slot). What the consumer has yet to take stays counted until it
    /// does, or until the slot is freed.
    fn recv_closed(&mut self, idx: u32) {
        if let Recv::Open { ended, .. } = &mut self.slots[idx as usize].recv {
            *ended = true;
        }
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
                });
                idx
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.id = stream;
        slot.body_over = false;
        slot.stream_blocked = false;
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
        slot.phase = Phase::Done;
        slot.pending = Bytes::new();
        slot.trailers = None;
        slot.body_over = false;
        slot.stream_blocked = false;
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

    /// Answers 431 to a request whose head is over the advertised limit.
    fn refuse_too_large(&mut self, stream: u32, end_stream: bool) {
        let mut block = Vec::with_capacity(8);
        self.begin_block(&mut block);
        hpack::encode_status(431, &mut block);
        hpack::encode_field("content-length", b"0", false, &mut block);
        self.write_block(stream, &block, true);
        if !end_stream {
            frame::write_rst(&mut self.wbuf, stream, Reason::NoError);
        }
        self.remember_reset(stream);
    }

    fn begin_block(&mut self, block: &mut Vec<u8>) {
        if let Some(size) = self.size_update.take() {
            hpack::encode_size_update(size, block);
        }
    }

    /// Writes a header block as HEADERS and, beyond the client's frame size,
    /// CONTINUATION frames.
    fn write_block(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        let mut chunks = block.chunks(self.peer_max_frame);
        let first = chunks.next().unwrap_or(&[]);
        let last = first.len() == block.len();
        let mut flags = if end_stream { frame::END_STREAM } else { 0 };
        if last {
            flags |= frame::END_HEADERS;
        }
        frame::write_head(&mut self.wbuf, first.len(), frame::HEADERS, flags, stream);
        self.wbuf.extend_from_slice(first);
        let mut rest = chunks.peekable();
        while let Some(c) = rest.next() {
            let flags = if rest.peek().is_none() {
                frame::END_HEADERS
            } else {
                0
            };
            frame::write_head(&mut self.wbuf, c.len(), frame::CONTINUATION, flags, stream);
            self.wbuf.extend_from_slice(c);
        }
    }

    /// A response head, written straight into the output when it fits one frame.
    fn write_response_head(
        &mut self,
        stream: u32,
        parts: &http::response::Parts,
        size: Option<u64>,
        end_stream: bool,
    ) {
        let at = self.wbuf.len();
        frame::write_head(&mut self.wbuf, 0, frame::HEADERS, 0, stream);
        let start = self.wbuf.len();
        let mut block = std::mem::take(&mut self.wbuf);
        self.begin_block(&mut block);
        let status = parts.status.as_u16();
        hpack::encode_status(status, &mut block);
        let (mut date, mut length) = (false, false);
        for (name, value) in &parts.headers {
            if connection_specific(name) {
                continue;
            }
            date |= name == header::DATE;
            length |= name == header::CONTENT_LENGTH;
            hpack::encode_field(
                name.as_str(),
                value.as_bytes(),
                value.is_sensitive(),
                &mut block,
            );
        }
        if !date {
            let mut now = Vec::with_capacity(29);
            crate::h1::wire::date(&mut now);
            hpack::encode_field("date", &now, false, &mut block);
        }
        if let (false, Some(n), false) =
            (length, size, status < 200 || status == 204 || status == 304)
        {
            let mut digits = itoa::Buffer::new();
            hpack::encode_field(
                "content-length",
                digits.format(n).as_bytes(),
                false,
                &mut block,
            );
        }
        self.wbuf = block;
        let len = self.wbuf.len() - start;
        if len <= self.peer_max_frame {
            frame::patch_len(&mut self.wbuf, at, len);
            self.wbuf[at + 4] = frame::END_HEADERS | if end_stream { frame::END_STREAM } else { 0 };
        } else {
            let block = self.wbuf.split_off(start);
            self.wbuf.truncate(at);
            self.write_block(stream, &block, end_stream);
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

    /// Sends what the response body has, as far as the windows allow.
    fn send_body(&mut self, idx: u32) {
        loop {
            let unwritten = self.unwritten();
            let slot = &mut self.slots[idx as usize];
            if slot.id == 0 {
                return;
            }
            let stream = slot.id;
            if !slot.pending.is_empty() {
                let n = (slot.pending.len() as i64)
                    .min(self.peer_max_frame as i64)
                    .min(slot.send_window)
                    .min(self.send_window);
                if n <= 0 {
                    if slot.send_window <= 0 {
                        slot.stream_blocked = true;
                    } else {
                        self.conn_blocked.push((idx, stream));
                    }
                    return;
                }
                if unwritten >= WRITE_HIGH {
                    self.write_blocked.push((idx, stream));
                    return;
                }
                let chunk = slot.pending.split_to(n as usize);
                slot.send_window -= n;
                self.send_window -= n;
                let end = slot.pending.is_empty() && slot.body_over && slot.trailers.is_none();
                frame::write_data(&mut self.wbuf, stream, &chunk, end);
                if end {
                    self.send_done(idx);
                    return;
                }
                continue;
            }
            if slot.body_over {
                match slot.trailers.take() {
                    Some(t) => {
                        let mut block = Vec::with_capacity(64);
                        self.begin_block(&mut block);
                        for (name, value) in &t {
                            if !connection_specific(name) {
                                hpack::encode_field(
                                    name.as_str(),
                                    value.as_bytes(),
                                    value.is_sensitive(),
                                    &mut block,
                                );
                            }
                        }
                        self.write_block(stream, &block, true);
                    }
                    None => frame::write_data(&mut self.wbuf, stream, &[], true),
                }
                self.send_done(idx);
                return;
            }
            let Phase::Body(body) = &mut slot.phase else {
                return;
            };
            if unwritten >= WRITE_HIGH {
                self.write_blocked.push((idx, stream));
                return;
            }
            let mut cx = Context::from_waker(&slot.waker);
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(None) => {
                    slot.body_over = true;
                    slot.phase = Phase::Done;
                }
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(data) => {
                        slot.pending = data;
                        if body.is_end_stream() {
                            slot.body_over = true;
                            slot.phase = Phase::Done;
                        }
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            slot.trailers = Some(t);
                            slot.body_over = true;
                            slot.phase = Phase::Done;
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(stream, error = %e, "response body failed");
                    self.free_slot(idx, Some(Reason::Internal));
                    return;
                }
            }
        }
    }

    /// The response is complete: the stream ends unless the client is still sending
    /// its body, which it is then asked to stop (RST_STREAM NO_ERROR, RFC 9113 §8.1).
    fn send_done(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        slot.phase = Phase::Done;
        slot.body_over = false;
        let open = matches!(slot.recv, Recv::Open { ended: false, .. });
        self.completed = self.completed.saturating_add(1);
        self.free_slot(idx, open.then_some(Reason::NoError));
    }

    /// Puts the slots that waited for write space back in line once there is some.
    fn unblock_writes(&mut self) -> bool {
        if self.write_blocked.is_empty() || self.unwritten() >= WRITE_HIGH {
            return false;
        }
        for (idx, id) in std::mem::take(&mut self.write_blocked) {
            if self.slots[idx as usize].id == id {
                self.local_ready.push(idx);
            }
        }
        true
    }

    fn flush<I: AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.woff < self.wbuf.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.wbuf[self.woff..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.woff += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.woff == self.wbuf.len() {
            self.wbuf.clear();
            self.woff = 0;
            if self.wbuf.capacity() > 4 * WRITE_HIGH {
                self.wbuf = Vec::with_capacity(4096);
            }
        } else if self.woff >= WRITE_HIGH {
            self.wbuf.drain(..self.woff);
            self.woff = 0;
        }
        if self.unflushed {
            // A no-op on TCP; TLS holds what was written until flushed.
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(fields: &[(&str, &str)]) -> Decoded {
        let mut d = Decoded {
            limit: 16 * 1024,
            ..Decoded::default()
        };
        for (n, v) in fields {
            d.field(n.as_bytes(), v.as_bytes());
        }
        d
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "t1.example.com"),
        (":path", "/a?b"),
    ];

    #[test]
    fn a_request_head_becomes_method_uri_and_headers() {
        let mut fields = GET.to_vec();
        fields.extend([("cookie", "a=1"), ("user-agent", "x"), ("cookie", "b=2")]);
        let mut d = decode(&fields);
        assert!(!d.malformed);
        assert_eq!(d.uri().unwrap().to_string(), "http://t1.example.com/a?b");
        assert_eq!(d.method, Some(Method::GET));
        assert_eq!(d.headers["cookie"], "a=1; b=2");
        assert_eq!(d.headers["user-agent"], "x");
        // Without :authority the URI is the path alone (Host names the tenant).
        let mut d = decode(
            &GET[..2]
                .iter()
                .chain(&GET[3..])
                .copied()
                .collect::<Vec<_>>(),
        );
        assert_eq!(d.uri().unwrap().to_string(), "/a?b");
        let mut d = decode(&[(":method", "CONNECT"), (":authority", "a.example:443")]);
        assert_eq!(d.uri().unwrap().to_string(), "a.example:443");
    }

    #[test]
    fn malformed_request_heads_are_recognised() {
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":method", "GET"),
            ],
            vec![
                (":method", "GET"),
                ("x", "1"),
                (":scheme", "http"),
                (":path", "/"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":status", "200"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("X-Up", "1"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("connection", "close"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("te", "gzip"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x", "a\nb"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("bad name", "1"),
            ],
        ];
        for fields in cases {
            assert!(decode(&fields).malformed, "{fields:?}");
        }
        // Missing or empty pseudo-headers give no URI.
        for fields in [
            vec![(":method", "GET"), (":scheme", "http")],
            vec![(":method", "GET"), (":scheme", "http"), (":path", "")],
            vec![(":scheme", "http"), (":path", "/")],
            vec![
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":path", "/"),
            ],
        ] {
            assert!(decode(&fields).uri().is_none(), "{fields:?}");
        }
        let ok = decode(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            ("te", "trailers"),
        ]);
        assert!(!ok.malformed);
    }

    #[test]
    fn the_header_list_size_counts_every_field() {
        let mut d = Decoded {
            limit: 100,
            ..Decoded::default()
        };
        d.field(b"x-a", &[b'a'; 40]);
        assert_eq!(d.size, 3 + 40 + 32);
        d.field(b"x-b", &[b'b'; 40]);
        assert!(d.size > d.limit);
        assert!(d.headers.get("x-b").is_none());
    }
}
