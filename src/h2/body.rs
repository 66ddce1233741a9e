//! A request body arriving in DATA frames: the connection pushes, the request's
//! consumer (the upstream exchange, possibly in another task) pulls. What the consumer
//! has taken is counted as released, for the connection's WINDOW_UPDATEs.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::metrics::TenantStats;

/// Released bytes that make the consumer wake the connection for a WINDOW_UPDATE.
const RELEASE_WAKE: u32 = 16 * 1024;

#[derive(Default)]
pub(crate) struct Inner {
    pub chunks: VecDeque<Bytes>,
    pub trailers: Option<HeaderMap>,
    /// END_STREAM was received.
    pub end: bool,
    /// The stream was reset (by the client, or by the connection for a protocol error).
    pub reset: bool,
    /// The consumer, waiting for data.
    pub consumer: Option<Waker>,
    /// Taken by the consumer since the connection last looked.
    pub released: u32,
    /// The consumer dropped the body: what arrives from now on is released at once.
    pub dropped: bool,
    /// The connection's waker for this stream (its slot), woken to send a WINDOW_UPDATE.
    pub conn: Option<Waker>,
    /// DATA payload received on the stream, whether or not the consumer takes it.
    pub received: u64,
    /// Where received bytes are counted, once the request has a tenant
    /// ([`RecvBody::count_received`]).
    pub counters: Option<Counters>,
}

/// A request's `request_body_bytes_total` (`None` when `server.metrics = false`) and
/// access-log `bytes_in` (`None` without an access log).
pub(crate) struct Counters {
    stats: Option<Arc<TenantStats>>,
    bytes_in: Option<Arc<AtomicU64>>,
}

impl Counters {
    fn add(&self, n: u64) {
        if let Some(s) = &self.stats {
            s.add_request_bytes(n);
        }
        if let Some(b) = &self.bytes_in {
            b.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Inner {
    /// DATA payload that arrived for the stream (the connection calls this).
    pub(crate) fn received(&mut self, n: u64) {
        self.received += n;
        if let Some(c) = &self.counters {
            c.add(n);
        }
    }
}

pub(crate) type Shared = Arc<Mutex<Inner>>;

pub(crate) fn lock(s: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Nothing in this module panics while holding the lock; a poisoned lock still
    // holds consistent data.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The body of an HTTP/2 request served by [`super::serve`].
pub struct RecvBody {
    shared: Shared,
    /// The request's content-length, if it sent one.
    remaining: Option<u64>,
    done: bool,
}

/// The client reset the stream, or sent a body that breaks the protocol.
#[derive(Debug)]
pub struct StreamReset;

impl std::fmt::Display for StreamReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the HTTP/2 stream was reset before its body ended")
    }
}

impl std::error::Error for StreamReset {}

impl RecvBody {
    pub(crate) fn new(shared: Shared, content_length: Option<u64>) -> RecvBody {
        RecvBody {
            shared,
            remaining: content_length,
            done: false,
        }
    }
}

impl RecvBody {
    /// Counts the body's bytes as the connection receives them — what has come so far
    /// at once — rather than as the upstream exchange takes them: an upstream that
    /// answers before it has read the body does not make it uncounted.
    pub fn count_received(
        &self,
        stats: Option<Arc<TenantStats>>,
        bytes_in: Option<Arc<AtomicU64>>,
    ) {
        let c = Counters { stats, bytes_in };
        let mut s = lock(&self.shared);
        c.add(s.received);
        s.counters = Some(c);
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = StreamReset;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamReset>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut s = lock(&this.shared);
        if let Some(chunk) = s.chunks.pop_front() {
            let n = chunk.len() as u32;
            let before = s.released;
            s.released = s.released.saturating_add(n);
            if before < RELEASE_WAKE && s.released >= RELEASE_WAKE {
                if let Some(w) = &s.conn {
                    w.wake_by_ref();
                }
            }
            if let Some(r) = &mut this.remaining {
                *r = r.saturating_sub(chunk.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.reset {
            this.done = true;
            return Poll::Ready(Some(Err(StreamReset)));
        }
        if let Some(t) = s.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if s.end {
            this.done = true;
            return Poll::Ready(None);
        }
        match &s.consumer {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.consumer = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.dropped = true;
        s.consumer = None;
        let buffered: usize = s.chunks.drain(..).map(|c| c.len()).sum();
        s.released = s.released.saturating_add(buffered as u32);
        if let Some(w) = s.conn.take() {
            w.wake();
        }
    }
}
