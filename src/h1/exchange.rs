//! The fast path's upstream side: plain-TCP HTTP/1.1 exchanges run on the client
//! connection's own task (no connection task, no channel), over a per-worker pool of
//! idle upstream sockets that hold no buffers while they wait.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::spare;
use super::wire::{self, Chunked, Extra, Framing, Response};
use crate::body::Finish;
use crate::error::{ProxyError, UpstreamFailure};
use crate::limits::{HeadDue, Upload};
use crate::metrics::{TenantStats, UpstreamKind};
use crate::upstream::{
    connect_tcp, drop_expired, Failover, MAX_IDLE_PER_TARGET, POOL_IDLE_TIMEOUT,
};

/// First read of a response; bodies stream through reads of `STREAM_READ`.
pub(super) const HEAD_READ: usize = 8 * 1024;
pub(super) const STREAM_READ: usize = 32 * 1024;

/// Idle sockets to one target, each with the time it came back; most recent last.
type IdleList = VecDeque<(UpSocket, Instant)>;

/// An upstream socket and the timer that bounds each exchange on it.
///
/// The timer lives as long as the socket. Re-armed for an exchange whose deadline is
/// later than the last one's (the usual case: the same timeout, a later start), it
/// only stores the new deadline, and tokio moves the entry in its wheel once, when the
/// old deadline comes; a timer per exchange was registered and removed under the
/// time driver's lock on every request (259 instructions of ~18,000, callgrind).
pub(super) struct UpSocket {
    pub stream: TcpStream,
    pub timer: Timer,
}

impl UpSocket {
    /// Whether an idle socket is still fit for a request. A socket that turned
    /// readable while idle has been closed by the upstream (or sent something
    /// unasked). Readiness is what the event loop last saw, so the check costs no
    /// system call unless the socket looks readable.
    fn still_idle(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(_) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// A deadline re-armed for each use: the exchange in progress on one upstream socket,
/// or (`h1::linger`) a client connection's wait for its next request.
pub(super) struct Timer(Pin<Box<tokio::time::Sleep>>);

/// A bounded wait ran past its deadline.
pub(super) struct Elapsed;

impl Timer {
    pub(super) fn new(deadline: tokio::time::Instant) -> Timer {
        Timer(Box::pin(tokio::time::sleep_until(deadline)))
    }

    /// Sets the deadline of the next use.
    pub(super) fn arm(&mut self, deadline: tokio::time::Instant) {
        if self.0.deadline() != deadline {
            self.0.as_mut().reset(deadline);
        }
    }

    /// Drops the waker of the last task that waited on it, which would otherwise keep
    /// that (finished) task's memory until the socket's next exchange.
    fn disarm(&mut self) {
        let _ = self
            .0
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
    }

    /// `fut`, unless it stays pending for `idle` (`None`: no limit), counted from its
    /// first `Pending`: a step of a streaming body, bounded by
    /// `server.body_idle_timeout`. One that is ready at once never reads the clock.
    pub(super) async fn idle<F: Future>(
        &mut self,
        idle: Option<Duration>,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        let mut fut = std::pin::pin!(fut);
        let mut armed = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let Some(idle) = idle else {
                return Poll::Pending;
            };
            if !armed {
                armed = true;
                self.arm(tokio::time::Instant::now() + idle);
            }
            self.0.as_mut().poll(cx).map(|()| Err(Elapsed))
        })
        .await
    }

    /// `fut`, unless the deadline passes first. `fut` is polled first: one that is
    /// ready at once never touches the timer.
    pub(super) async fn bound<F: Future>(&mut self, fut: F) -> Result<F::Output, Elapsed> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.0.as_mut().poll(cx).map(|()| Err(Elapsed))
        })
        .await
    }
}

/// One worker's idle upstream sockets, by target.
///
/// Keyed by the target's text as written, not by `Authority`: its `Hash` feeds the
/// hasher one lower-cased byte at a time and its `Eq` compares ignoring case, which
/// made the two lookups of every request about 2,000 instructions (callgrind). Two
/// spellings of one host differing in case only get two lists, which is harmless.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Box<str>, IdleList, foldhash::fast::RandomState>>,
}

impl Pool {
    /// The most recently used idle socket that is still open (`UpSocket::still_idle`);
    /// the closed ones met on the way are dropped.
    pub(super) fn checkout(&self, target: &Authority, now: Instant) -> Option<UpSocket> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(target.as_str())?;
        while let Some((s, since)) = list.pop_back() {
            if now.saturating_duration_since(since) >= POOL_IDLE_TIMEOUT {
                // Everything before it is older still.
                list.clear();
                return None;
            }
            if s.still_idle() {
                return Some(s);
            }
        }
        None
    }

    /// Drops the sockets idle for `POOL_IDLE_TIMEOUT` and those the upstream has
    /// closed (or written to unasked), and the lists left empty: `checkout` and
    /// `checkin` only look at the target they serve, so without this a target that
    /// went quiet, or that a reload removed, would keep its sockets — half-closed ones
    /// too — for ever. The worker calls it every few seconds.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            drop_expired(list, now, |(_, since)| *since);
            list.retain(|(s, _)| s.still_idle());
            !list.is_empty()
        });
    }

    pub(super) fn checkin(&self, target: &Authority, mut s: UpSocket, now: Instant) {
        s.timer.disarm();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = match idle.get_mut(target.as_str()) {
            Some(l) => l,
            None => idle.entry(target.as_str().into()).or_default(),
        };
        // The oldest are at the front: drop the expired ones as new ones come back.
        drop_expired(list, now, |(_, since)| *since);
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push_back((s, now));
        }
    }
}

/// One request to forward.
pub struct Outgoing<'a> {
    pub parts: &'a http::request::Parts,
    /// The gateway's headers, written after the map's.
    pub added: &'a crate::headers::Added<'a>,
    pub target: &'a Authority,
    /// `target`'s pool (its name for errors and logs), and its other targets for
    /// when `target` cannot be connected to.
    pub failover: Failover<'a>,
    pub timeout: Duration,
    /// `server.body_idle_timeout`.
    pub body_idle: Option<Duration>,
    pub started: Instant,
    /// `Content-Length` of the request body.
    pub body_len: u64,
    pub counters: RequestCounters,
    pub extra: Extra<'a>,
}

/// How an exchange ended.
pub enum Done {
    /// The response went out whole, `at` then; `false` when the client connection
    /// must close anyway (a request body left unread).
    Served { client_reusable: bool, at: Instant },
    /// Failed before anything was written to the client; `client_reusable` says
    /// whether the request was read to its end.
    Refused {
        error: ProxyError,
        client_reusable: bool,
    },
    /// Failed after the response head went out, or the client went away: close.
    Broken,
    /// The client closed its connection (or shut down its sending side) before the
    /// response head came: nothing was answered; the caller records the request as
    /// [`CLIENT_CLOSED`](crate::proxy::CLIENT_CLOSED) (status 499, as nginx logs it).
    Gone,
}

/// How the client's side of an exchange ended before the response did.
enum ClientEnd {
    /// It broke its request body mid-upload.
    BrokeBody,
    /// It closed (or reset) its connection.
    Gone,
}

/// Resolves when the client has closed or reset its connection — not when it sends
/// more (a pipelined request, left in the socket for after this exchange), after which
/// it stays pending. A quiet socket costs no system call: readiness is what the event
/// loop last saw, and the request's short read cleared it. Like nginx (and hyper's
/// server), a client that only shuts down its sending side counts as gone: nothing
/// tells the two apart.
async fn client_gone(client: &mut tokio::net::tcp::ReadHalf<'_>) {
    let mut more = false;
    std::future::poll_fn(|cx| {
        if more {
            return Poll::Pending;
        }
        let mut byte = [std::mem::MaybeUninit::uninit(); 1];
        let mut probe = tokio::io::ReadBuf::uninit(&mut byte);
        match client.poll_peek(cx, &mut probe) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                more = true;
                Poll::Pending
            }
        }
    })
    .await
}

/// Why reaching the upstream or reading its response failed.
pub(super) enum Failure {
    /// Before any response byte: a reused connection the upstream had closed, so an
    /// idempotent request may be retried on a new one.
    Early(UpstreamFailure),
    Upstream(UpstreamFailure),
    Timeout,
    /// A request body that made no progress for `body_idle_timeout` (this long),
    /// waiting on this side, before the head came.
    Stalled(Stall, Duration),
    /// After the head was written to the client.
    Late,
}

impl Failure {
    /// The gateway's error for a failure before anything reached the client (a `Late`
    /// one, which has no answer of its own, reads as a reset).
    pub(super) fn into_error(self, upstream: &Arc<str>, timeout: Duration) -> ProxyError {
        match self {
            Failure::Timeout => ProxyError::UpstreamTimeout {
                upstream: upstream.clone(),
                after: timeout,
            },
            Failure::Early(failure) | Failure::Upstream(failure) => ProxyError::UpstreamError {
                upstream: upstream.clone(),
                failure,
            },
            Failure::Stalled(side, after) => side.error(upstream, after),
            Failure::Late => ProxyError::UpstreamError {
                upstream: upstream.clone(),
                failure: UpstreamFailure::Reset,
            },
        }
    }
}

/// Forwards one request and writes the response to the client. `on_head` is called
/// with the status once the upstream's head has arrived and returns the work to do
/// when the response is over.
pub async fn forward(
    pool: &Pool,
    client: &mut TcpStream,
    cbuf: &mut BytesMut,
    req: Outgoing<'_>,
    on_head: impl FnOnce(u16) -> Finish,
) -> Done {
    let mut wbuf = spare::Scratch::new(1024);
    wire::write_request_head(&mut wbuf, req.parts, req.added, false);
    // The part of the body that came with the head goes out in the same write.
    let in_buf = usize::try_from(req.body_len)
        .unwrap_or(usize::MAX)
        .min(cbuf.len());
    wbuf.extend_from_slice(&cbuf[..in_buf]);
    cbuf.advance(in_buf);
    req.counters.add(in_buf as u64);
    let body_rest = req.body_len - in_buf as u64;
    let deadline = tokio::time::Instant::from_std(req.started + req.timeout);
    // A body still to come: the head is due `request_timeout` after it has gone up.
    let upload = (body_rest > 0).then(Upload::new);
    let clock = upload.as_ref().map(|upload| HeadClock {
        upload,
        timeout: req.timeout,
        idle: req.body_idle,
    });
    let idempotent = idempotent(&req.parts.method, body_rest);
    let is_head = req.parts.method == http::Method::HEAD;
    let mut on_head = Some(on_head);
    let mut force_fresh = false;
    let mut target = req.target;
    let mut failover = req.failover;
    let upstream = &failover.pool().name;
    let err = |f: Failure| f.into_error(upstream, req.timeout);
    loop {
        let (mut up, reused) = match open(pool, target, force_fresh, deadline, req.started).await {
            Ok(s) => s,
            Err(f) => match fail_over(&f, target, &mut failover) {
                Some(next) => {
                    target = next;
                    continue;
                }
                None => return refused(err(f), body_rest),
            },
        };
        match up.timer.bound(up.stream.write_all(&wbuf)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if reused => {
                // Closed under us before it read anything: once more, on a new one.
                force_fresh = true;
                continue;
            }
            Ok(Err(_)) => {
                return refused(err(Failure::Upstream(UpstreamFailure::Reset)), body_rest)
            }
            Err(_) => return refused(err(Failure::Timeout), body_rest),
        }
        let mut rbuf = spare::Buf::new(HEAD_READ);
        // Set once the request body has been read to its end, so that the client
        // connection can carry the next request.
        let mut body_read = body_rest == 0;
        let mut finish = None;
        let outcome = {
            let (mut cr, mut cw) = client.split();
            let (mut ur, mut uw) = up.stream.split();
            // The client's side of the exchange: the rest of the body goes up, then
            // the connection is watched for the client going away.
            let client_side = async {
                if body_rest > 0 {
                    let copied = copy_body(
                        &mut cr,
                        &mut uw,
                        cbuf,
                        body_rest,
                        &req.counters,
                        upload.as_ref(),
                    );
                    match copied.await {
                        Ok(()) => body_read = true,
                        Err(UploadError::Client(())) => return ClientEnd::BrokeBody,
                        // The upstream may still answer; the client's unsent rest
                        // keeps the connection from being watched (below).
                        Err(UploadError::Upstream) => {}
                    }
                }
                client_gone(&mut cr).await;
                ClientEnd::Gone
            };
            let respond = respond(
                &mut ur,
                &mut cw,
                &mut rbuf,
                &mut up.timer,
                Responding {
                    is_head,
                    extra: &req.extra,
                    upstream,
                    body_idle: req.body_idle,
                    clock,
                    // The client sent `TE: trailers`.
                    trailers: req.added.te_trailers(),
                },
                &mut on_head,
                &mut finish,
            );
            tokio::select! {
                biased;
                r = respond => Ok(r),
                end = client_side => Err(end),
            }
        };
        let result = match outcome {
            Ok(result) => result,
            // The client broke its body mid-upload (closed, reset, or sent a bad one).
            Err(ClientEnd::BrokeBody) if on_head.is_some() => {
                return Done::Refused {
                    error: ProxyError::BadRequestBody,
                    client_reusable: false,
                }
            }
            Err(ClientEnd::BrokeBody) => return Done::Broken,
            Err(ClientEnd::Gone) => {
                tracing::debug!(%upstream, "client closed its connection before the response was over");
                if let Some(log) = finish.as_mut().and_then(|f| f.log.as_mut()) {
                    log.reason = Some(crate::proxy::CLIENT_CLOSED);
                }
                return if on_head.is_some() {
                    Done::Gone
                } else {
                    Done::Broken
                };
            }
        };
        return match result {
            Ok(reusable) => {
                // One reading of the clock for the socket's idle time and the client's.
                let at = Instant::now();
                if reusable && body_read {
                    pool.checkin(target, up, at);
                }
                Done::Served {
                    client_reusable: body_read,
                    at,
                }
            }
            Err(Failure::Early(_)) if reused && idempotent && body_rest == 0 => {
                force_fresh = true;
                continue;
            }
            Err(Failure::Late) => Done::Broken,
            Err(f) => Done::Refused {
                error: err(f),
                client_reusable: body_read,
            },
        };
    }
}

/// A socket to `target`: the pool's most recently used idle one (unless `fresh`), or
/// a new connection made before `deadline`, its timer armed for `deadline`. The flag
/// says whether it was reused. `now`: the request's start, close enough to tell the
/// pool's expired sockets (idle for `POOL_IDLE_TIMEOUT`) without reading the clock
/// again.
pub(super) async fn open(
    pool: &Pool,
    target: &Authority,
    fresh: bool,
    deadline: tokio::time::Instant,
    now: Instant,
) -> Result<(UpSocket, bool), Failure> {
    if !fresh {
        if let Some(mut s) = pool.checkout(target, now) {
            s.timer.arm(deadline);
            return Ok((s, true));
        }
    }
    let mut timer = Timer::new(deadline);
    match timer.bound(connect_tcp(target)).await {
        Ok(Ok(stream)) => Ok((UpSocket { stream, timer }, false)),
        Ok(Err(f)) => Err(Failure::Upstream(f)),
        Err(Elapsed) => Err(Failure::Timeout),
    }
}

/// After `open` failed with `f`: the pool's next target when `f` is a failed
/// connection and there is one to try (nothing was sent, so any request may go).
pub(super) fn fail_over<'a>(
    f: &Failure,
    target: &Authority,
    failover: &mut Failover<'a>,
) -> Option<&'a Authority> {
    match f {
        Failure::Upstream(UpstreamFailure::Connect) => failover.next(target),
        _ => None,
    }
}

/// Whether a request may be sent again after a reused connection closed without
/// answering (the upstream may have seen it).
pub(super) fn idempotent(method: &http::Method, body_left: u64) -> bool {
    matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    ) || body_left == 0 && matches!(*method, http::Method::PUT | http::Method::DELETE)
}

fn refused(error: ProxyError, body_rest: u64) -> Done {
    Done::Refused {
        error,
        client_reusable: body_rest == 0,
    }
}

/// How a request body upload, client to upstream, ended early.
pub(super) enum UploadError<E> {
    /// The client's side failed (`E` says how, where the caller needs to know).
    Client(E),
    /// The upstream stopped reading; it may still answer.
    Upstream,
}

/// Awaits the response `head` while `upload` sends the rest of the request body beside
/// it. Returns the head and whether the whole body went up; an upload the client broke
/// ends the wait with its error.
pub(super) async fn while_uploading<H, E>(
    head: impl std::future::Future<Output = H>,
    upload: impl std::future::Future<Output = Result<(), UploadError<E>>>,
) -> Result<(H, bool), E> {
    tokio::pin!(head, upload);
    let (mut uploading, mut sent) = (true, false);
    loop {
        tokio::select! {
            biased;
            h = &mut head => return Ok((h, sent)),
            r = &mut upload, if uploading => {
                uploading = false;
                match r {
                    Ok(()) => sent = true,
                    Err(UploadError::Client(e)) => return Err(e),
                    Err(UploadError::Upstream) => {}
                }
            }
        }
    }
}

/// The rest of a `Content-Length` request body, client to upstream. Bytes past the
/// body (a pipelined request) stay in `cbuf`.
async fn copy_body<R, W>(
    client: &mut R,
    up: &mut W,
    cbuf: &mut BytesMut,
    mut rest: u64,
    counters: &RequestCounters,
    upload: Option<&Upload>,
) -> Result<(), UploadError<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while rest > 0 {
        if cbuf.is_empty() {
            cbuf.reserve(STREAM_READ);
            if let Some(u) = upload {
                u.waiting_on_client(true);
            }
            match client.read_buf(cbuf).await {
                Ok(0) | Err(_) => return Err(UploadError::Client(())),
                Ok(_) => {}
            }
            if let Some(u) = upload {
                u.waiting_on_client(false);
                u.progress();
            }
        }
        let n = usize::try_from(rest).unwrap_or(usize::MAX).min(cbuf.len());
        if up.write_all(&cbuf[..n]).await.is_err() {
            // The upstream stopped reading; its answer, if any, is due from now.
            if let Some(u) = upload {
                u.end();
            }
            return Err(UploadError::Upstream);
        }
        cbuf.advance(n);
        counters.add(n as u64);
        rest -= n as u64;
    }
    if let Some(u) = upload {
        u.end();
    }
    Ok(())
}

/// What decides, when the head's timer fires, whether the head is late: for a request
/// whose body is (or was) still going up, how that upload goes ([`Upload`]).
#[derive(Clone, Copy)]
pub(super) struct HeadClock<'a> {
    pub upload: &'a Upload,
    /// `request_timeout`, counted from the end of the upload.
    pub timeout: Duration,
    /// `server.body_idle_timeout`, for the upload while it goes on.
    pub idle: Option<Duration>,
}

/// What a response-head parser made of the bytes read so far.
pub(super) enum Step<T> {
    Partial,
    /// A 1xx interim response of this many bytes, to skip.
    Interim(usize),
    Head(T),
    Malformed,
}

/// Reads from the upstream until `parse` finds a whole response head, skipping 1xx
/// responses, before `timer`'s deadline. A connection closed before any byte is an `Early`
/// failure (the request may be retried on a new one).
pub(super) async fn read_head<R, T>(
    up: &mut R,
    rbuf: &mut BytesMut,
    timer: &mut Timer,
    clock: Option<HeadClock<'_>>,
    mut parse: impl FnMut(&mut BytesMut) -> Step<T>,
) -> Result<T, Failure>
where
    R: AsyncRead + Unpin,
{
    let mut any = false;
    loop {
        if !rbuf.is_empty() {
            match parse(rbuf) {
                Step::Head(h) => return Ok(h),
                Step::Interim(n) => {
                    rbuf.advance(n);
                    continue;
                }
                // Not whole in MAX_RESPONSE_HEAD bytes: longer than the limit.
                Step::Partial if rbuf.len() < wire::MAX_RESPONSE_HEAD => {}
                Step::Partial | Step::Malformed => {
                    return Err(Failure::Upstream(UpstreamFailure::Protocol))
                }
            }
        }
        rbuf.reserve(HEAD_READ);
        match timer.bound(up.read_buf(rbuf)).await {
            Ok(Ok(n)) if n > 0 => any = true,
            // Closed or reset: before any byte of a response, or in the middle of one.
            Ok(_) if any => return Err(Failure::Upstream(UpstreamFailure::Reset)),
            Ok(_) => return Err(Failure::Early(UpstreamFailure::Reset)),
            Err(_) => {
                let Some(c) = clock else {
                    return Err(Failure::Timeout);
                };
                match c
                    .upload
                    .head_due(tokio::time::Instant::now(), c.timeout, c.idle)
                {
                    HeadDue::At(due) => timer.arm(due),
                    HeadDue::Timeout => return Err(Failure::Timeout),
                    HeadDue::Stalled(side) => {
                        return Err(Failure::Stalled(side, c.idle.unwrap_or_default()))
                    }
                }
            }
        }
    }
}

/// Which side stopped a response body for longer than `server.body_idle_timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// The upstream sent nothing.
    Upstream,
    /// The client took nothing.
    Client,
}

impl Stall {
    /// The answer to a request whose body stopped going up for `after` before the
    /// head came: 408 when the client sent nothing, 504 when the upstream took nothing.
    pub fn error(self, upstream: &Arc<str>, after: Duration) -> ProxyError {
        match self {
            Stall::Client => ProxyError::RequestBodyTimeout { after },
            Stall::Upstream => ProxyError::UpstreamTimeout {
                upstream: upstream.clone(),
                after,
            },
        }
    }

    /// The access log's `reason` for a response cut off this way.
    pub fn reason(self) -> &'static str {
        match self {
            Stall::Upstream => "upstream_stalled",
            Stall::Client => "client_stalled",
        }
    }

    /// Records a response cut off this way: the access-log reason, and for an
    /// upstream that went quiet, `upstream_errors_total{kind="timeout"}`.
    pub fn record(self, finish: Option<&mut Finish>, upstream: &Arc<str>, idle: Duration) {
        tracing::debug!(%upstream, side = ?self, ?idle, "response body cut off: no progress (server.body_idle_timeout)");
        let Some(f) = finish else {
            return;
        };
        if let Some(log) = &mut f.log {
            log.reason = Some(self.reason());
        }
        if let (Stall::Upstream, Some(stats)) = (self, &f.stats) {
            stats.record_upstream_failure(upstream, UpstreamKind::Timeout);
        }
    }
}

/// What `respond` needs to know about the exchange besides its sockets.
struct Responding<'a> {
    is_head: bool,
    extra: &'a Extra<'a>,
    upstream: &'a Arc<str>,
    body_idle: Option<Duration>,
    clock: Option<HeadClock<'a>>,
    /// Pass the trailer section of a chunked body on.
    trailers: bool,
}

/// Reads the response head (skipping 1xx), writes the client's head, streams the
/// body, each step of it bounded by `server.body_idle_timeout`. `Ok(true)` when the
/// upstream connection can carry another exchange.
async fn respond<R, W>(
    up: &mut R,
    client: &mut W,
    rbuf: &mut BytesMut,
    timer: &mut Timer,
    r: Responding<'_>,
    on_head: &mut Option<impl FnOnce(u16) -> Finish>,
    finish: &mut Option<Finish>,
) -> Result<bool, Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Responding {
        is_head,
        extra,
        upstream,
        body_idle,
        clock,
        trailers,
    } = r;
    let mut out = spare::Scratch::new(1024);
    let head = read_head(up, rbuf, timer, clock, |rbuf| {
        out.clear();
        match wire::parse_response(rbuf, is_head, extra, &mut out) {
            Ok(Response::Head(h)) => Step::Head(h),
            Ok(Response::Interim(n)) => Step::Interim(n),
            Ok(Response::Partial) => Step::Partial,
            Err(_) => Step::Malformed,
        }
    })
    .await?;
    rbuf.advance(head.head_len);
    // A chunked body already broken in what came with the head is a 502: nothing has
    // reached the client yet, and the response is not recorded as the upstream's.
    // Made only for a chunked body: the decoder is most of the exchange's state.
    let mut chunked = None;
    let mut first = None;
    if matches!(head.framing, Framing::Chunked) {
        let decoder = chunked.insert(match trailers {
            true => Chunked::default().keeping_trailers(),
            false => Chunked::default(),
        });
        first = Some(
            decoder
                .decode(rbuf, &mut out)
                .map_err(|_| Failure::Upstream(UpstreamFailure::Protocol))?,
        );
    }
    let Some(on_head) = on_head.take() else {
        return Err(Failure::Late);
    };
    // Dropped (in-flight slot released, response recorded) just before the last
    // write, as hyper does at the last body frame: a client that sends its next
    // request the moment it has this response must find the slot free.
    *finish = Some(on_head(head.status));
    fn count(finish: &mut Option<Finish>, n: u64) {
        if let Some(f) = finish {
            f.bytes_out += n;
        }
    }
    // A response cut off after its head, by the upstream (`Some(kind)`: counted in
    // `upstream_errors_total`) or by the client, with the `n` bytes counted for the
    // write that failed taken back; both leave their reason in the access log.
    let upstream_broke = |finish: &mut Option<Finish>, kind: UpstreamKind| {
        if let Some(f) = finish {
            f.upstream_broke(upstream, kind);
        }
        Failure::Late
    };
    fn client_broke(finish: &mut Option<Finish>, n: u64) -> Failure {
        if let Some(f) = finish {
            f.bytes_out = f.bytes_out.saturating_sub(n);
            if let Some(log) = &mut f.log {
                log.reason = Some(crate::proxy::CLIENT_CLOSED);
            }
        }
        Failure::Late
    }
    // One step of the body — a write to the client, a read from the upstream —
    // bounded by `server.body_idle_timeout`.
    macro_rules! step {
        ($side:expr, $fut:expr) => {
            match timer.idle(body_idle, $fut).await {
                Ok(r) => r,
                Err(Elapsed) => {
                    let idle = body_idle.unwrap_or_default();
                    $side.record(finish.as_mut(), upstream, idle);
                    return Err(Failure::Late);
                }
            }
        };
    }
    let mut body_ok = true;
    match head.framing {
        Framing::Empty => {
            finish.take();
            step!(Stall::Client, client.write_all(&out)).map_err(|_| Failure::Late)?;
        }
        Framing::Length(len) => {
            let mut rest = len;
            let n = usize::try_from(rest).unwrap_or(usize::MAX).min(rbuf.len());
            out.extend_from_slice(&rbuf[..n]);
            rbuf.advance(n);
            rest -= n as u64;
            count(finish, n as u64);
            if rest == 0 {
                finish.take();
            }
            step!(Stall::Client, client.write_all(&out))
                .map_err(|_| client_broke(finish, n as u64))?;
            while rest > 0 {
                rbuf.reserve(STREAM_READ);
                match step!(Stall::Upstream, up.read_buf(rbuf)) {
                    Ok(0) | Err(_) => return Err(upstream_broke(finish, UpstreamKind::Reset)),
                    Ok(_) => {}
                }
                let n = usize::try_from(rest).unwrap_or(usize::MAX).min(rbuf.len());
                rest -= n as u64;
                count(finish, n as u64);
                if rest == 0 {
                    finish.take();
                }
                step!(Stall::Client, client.write_all(&rbuf[..n]))
                    .map_err(|_| client_broke(finish, n as u64))?;
                rbuf.advance(n);
            }
        }
        Framing::Chunked => loop {
            // Made above.
            let chunked = chunked.get_or_insert_with(Chunked::default);
            let (used, payload) = match first.take() {
                Some(decoded) => decoded,
                None => chunked
                    .decode(rbuf, &mut out)
                    .map_err(|_| upstream_broke(finish, UpstreamKind::Protocol))?,
            };
            rbuf.advance(used);
            count(finish, payload);
            if chunked.is_done() {
                finish.take();
            }
            if !out.is_empty() {
                step!(Stall::Client, client.write_all(&out))
                    .map_err(|_| client_broke(finish, payload))?;
                out.clear();
            }
            if chunked.is_done() {
                break;
            }
            rbuf.reserve(STREAM_READ);
            match step!(Stall::Upstream, up.read_buf(rbuf)) {
                Ok(0) | Err(_) => return Err(upstream_broke(finish, UpstreamKind::Reset)),
                Ok(_) => {}
            }
        },
        Framing::Close => {
            body_ok = false;
            loop {
                wire::write_chunk(&mut out, rbuf);
                let n = rbuf.len() as u64;
                count(finish, n);
                rbuf.clear();
                step!(Stall::Client, client.write_all(&out))
                    .map_err(|_| client_broke(finish, n))?;
                out.clear();
                rbuf.reserve(STREAM_READ);
                match step!(Stall::Upstream, up.read_buf(rbuf)) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return Err(upstream_broke(finish, UpstreamKind::Reset)),
                }
            }
            finish.take();
            step!(Stall::Client, client.write_all(wire::LAST_CHUNK)).map_err(|_| Failure::Late)?;
        }
    }
    Ok(body_ok && head.reusable && rbuf.is_empty())
}

/// Where request body bytes are counted: the tenant's metrics, the access-log record.
pub struct RequestCounters {
    pub stats: Option<Arc<TenantStats>>,
    pub bytes_in: Option<Arc<AtomicU64>>,
}

impl RequestCounters {
    fn add(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(stats) = &self.stats {
            stats.add_request_bytes(n);
        }
        if let Some(b) = &self.bytes_in {
            b.fetch_add(n, Ordering::Relaxed);
        }
    }
}
