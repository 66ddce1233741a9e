//! The two wrappers through which an admin connection reports to its [`Conn`]: the
//! socket ([`Watched`]: bytes read, responses flushed) and each response's body
//! ([`Tracked`]: the request in flight until its body is dropped, and each piece
//! taken).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conns::Conn;
use crate::body::ProxyBody;

/// The most of a response body handed to hyper at a time. hyper's HTTP/2 server takes
/// a body's next frame before it waits for flow-control window, and hands it to the
/// `h2` crate whole once the window holds a byte: `/metrics` of a large config (9 MB,
/// one frame) was handed over at once and buffered for a client that never opens its
/// window, out of sight here (the body taken, the connection looked idle), or waited in
/// hyper for a window of 0. In pieces, what waits beyond the client's window is one
/// piece, and each piece taken is progress that [`Conn::stalled`] sees. The size of an
/// HTTP/2 frame's payload unless the client allows more.
const PIECE: usize = 16 * 1024;

/// A request in progress, until its response body is dropped: by hyper once it has
/// taken the whole body (or at once for `HEAD`), or when the connection ends.
pub(super) struct InFlight(pub(super) Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
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
