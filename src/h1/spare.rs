//! Buffers a worker thread keeps between requests. A connection holds no buffer
//! while it waits for its next request (that is what keeps idle connections small),
//! so without these every request would allocate and free its read buffer, the
//! request head it writes upstream, the upstream read buffer and the head it writes
//! back. Each worker runs on its own thread, so the lists are thread-local and need
//! no lock; they are bounded in total bytes and in the size of a buffer they keep.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use bytes::BytesMut;
use http::HeaderMap;

/// Bytes of write buffers kept per thread (read buffers: `KEEP_BUF_BYTES` per size
/// class): a few dozen, for most of the exchanges in progress at one moment under the
/// load benchmark's 64 connections. Kept buffers count against every idle
/// connection's share of memory in the idle benchmark (10,000 connections): read lists
/// of 2 × 512 KiB put it at 1.02 KiB per connection, against 0.82 with one list of
/// 256 KiB. Past this, buffers are freed as before.
const KEEP_BYTES: usize = 256 * 1024;
/// Read buffers are kept by size class, each class with twice `KEEP_BYTES`: client
/// read buffers (4 KiB) and upstream read buffers (8 KiB) in one list meant a 4 KiB
/// buffer taken for an upstream read was grown, an allocation anyway; and under the
/// load benchmark's 64 connections both kinds are in use 64 at a time.
const KEEP_BUF_BYTES: usize = 2 * KEEP_BYTES;
/// The smallest capacity of the larger class of read buffers.
const LARGE_BUF: usize = 8 * 1024;
/// A buffer grown past this (a large body went through it) is freed, not kept.
const MAX_KEPT: usize = 64 * 1024;

/// Kept buffers of one kind, and their total capacity.
struct List<T> {
    items: Vec<T>,
    bytes: usize,
}

impl<T> Default for List<T> {
    fn default() -> Self {
        List {
            items: Vec::new(),
            bytes: 0,
        }
    }
}

impl<T> List<T> {
    fn pop(&mut self, cap: impl Fn(&T) -> usize) -> Option<T> {
        let item = self.items.pop()?;
        self.bytes -= cap(&item);
        Some(item)
    }

    fn push(&mut self, item: T, cap: usize, keep: usize) {
        if self.bytes + cap <= keep {
            self.bytes += cap;
            self.items.push(item);
        }
    }
}

#[derive(Default)]
struct Lists {
    /// Read buffers under `LARGE_BUF`, and the others.
    bufs: [List<BytesMut>; 2],
    vecs: List<Vec<u8>>,
    maps: Vec<HeaderMap>,
}

/// Request header maps kept per thread (each one or two KiB for a usual request: as
/// many as requests in progress at once under the load benchmark's 64 connections),
/// and the largest kept: a map grown past it went to an unusual request.
const KEEP_MAPS: usize = 64;
const MAX_KEPT_MAP: usize = 64;

thread_local! {
    static LISTS: RefCell<Lists> = RefCell::new(Lists::default());
}

/// An empty buffer with room for at least `size` bytes.
fn buf(size: usize) -> BytesMut {
    let kept = LISTS.with(|l| l.borrow_mut().bufs[class(size)].pop(BytesMut::capacity));
    match kept {
        Some(mut b) => {
            b.reserve(size);
            b
        }
        None => BytesMut::with_capacity(size),
    }
}

/// Keeps `b` for a later request when nothing else still points into it (bytes split
/// off it and handed on, such as a response body, keep their allocation alive).
/// `size` is the capacity it was made or taken with: a buffer that has been read
/// from (advanced) or split has only what is left after that as its capacity, and is
/// kept only once its whole allocation is back in front.
fn give_buf(mut b: BytesMut, size: usize) {
    let cap = b.capacity();
    if cap == 0 || cap > MAX_KEPT {
        return;
    }
    b.clear();
    // Moves the start back over what was read, when this handle is the allocation's
    // sole owner (`try_reclaim` of no more than the capacity left would succeed
    // without doing that).
    if !b.try_reclaim(size.max(cap)) {
        return;
    }
    let cap = b.capacity();
    LISTS.with(|l| l.borrow_mut().bufs[class(cap)].push(b, cap, KEEP_BUF_BYTES));
}

/// The list of read buffers for a capacity (or a wanted size).
fn class(cap: usize) -> usize {
    usize::from(cap >= LARGE_BUF)
}

/// An empty `Vec` with room for at least `size` bytes.
fn vec(size: usize) -> Vec<u8> {
    let mut v = LISTS
        .with(|l| l.borrow_mut().vecs.pop(Vec::capacity))
        .unwrap_or_default();
    v.reserve(size);
    v
}

/// Keeps `v` for a later request.
fn give_vec(mut v: Vec<u8>) {
    let cap = v.capacity();
    if cap == 0 || cap > MAX_KEPT {
        return;
    }
    v.clear();
    LISTS.with(|l| l.borrow_mut().vecs.push(v, cap, KEEP_BYTES));
}

/// An empty header map with room for at least `size` headers: each request's map
/// is two allocations (its index and its entries) that a kept one saves.
pub(super) fn header_map(size: usize) -> HeaderMap {
    let mut m = LISTS
        .with(|l| l.borrow_mut().maps.pop())
        .unwrap_or_default();
    m.reserve(size);
    m
}

/// Keeps `m`'s allocations for a later request; its headers are dropped now.
fn give_header_map(mut m: HeaderMap) {
    if m.capacity() == 0 || m.capacity() > MAX_KEPT_MAP {
        return;
    }
    m.clear();
    LISTS.with(|l| {
        let maps = &mut l.borrow_mut().maps;
        if maps.len() < KEEP_MAPS {
            maps.push(m);
        }
    });
}

/// A request head whose header map goes back to the thread's list when the request
/// is over.
pub(super) struct Request(pub http::request::Parts);

impl Deref for Request {
    type Target = http::request::Parts;
    fn deref(&self) -> &http::request::Parts {
        &self.0
    }
}

impl DerefMut for Request {
    fn deref_mut(&mut self) -> &mut http::request::Parts {
        &mut self.0
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        give_header_map(std::mem::take(&mut self.0.headers));
    }
}

/// What the thread's lists keep, and how each kind goes back (`size`: what it was
/// taken with).
pub(super) trait Kept: Default {
    fn give_back(self, size: usize);
}

impl Kept for BytesMut {
    fn give_back(self, size: usize) {
        give_buf(self, size)
    }
}

impl Kept for Vec<u8> {
    fn give_back(self, _: usize) {
        give_vec(self)
    }
}

/// A buffer from the thread's lists that goes back to them when dropped.
#[derive(Default)]
pub(super) struct Spare<T: Kept> {
    item: T,
    /// The capacity it was taken with.
    size: usize,
}

/// A read buffer.
pub(super) type Buf = Spare<BytesMut>;
/// A write buffer.
pub(super) type Scratch = Spare<Vec<u8>>;

impl Spare<BytesMut> {
    pub(super) fn new(size: usize) -> Buf {
        let item = buf(size);
        let size = item.capacity();
        Spare { item, size }
    }

    /// The bytes, for keeps (the buffer is not given back).
    pub(super) fn take(&mut self) -> BytesMut {
        std::mem::take(&mut self.item)
    }
}

impl Spare<Vec<u8>> {
    pub(super) fn new(size: usize) -> Scratch {
        Spare {
            item: vec(size),
            size,
        }
    }
}

impl<T: Kept> Deref for Spare<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item
    }
}

impl<T: Kept> DerefMut for Spare<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.item
    }
}

impl<T: Kept> Drop for Spare<T> {
    fn drop(&mut self) {
        std::mem::take(&mut self.item).give_back(self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_still_shared_is_not_kept_and_a_free_one_comes_back_whole() {
        let mut b = buf(4096);
        let ptr = b.as_ptr();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\nrest");
        let head = b.split_to(18).freeze();
        give_buf(b, 4096);
        // `head` still points into the allocation: it was not kept.
        let other = buf(4096);
        assert_ne!(other.as_ptr(), ptr);
        drop(head);
        give_buf(other, 4096);

        let mut b = buf(4096);
        let ptr = b.as_ptr();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        drop(b.split_to(10).freeze());
        give_buf(b, 4096);
        let again = buf(4096);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty() && again.capacity() >= 4096);
    }

    #[test]
    fn a_buffer_read_from_comes_back_whole_and_in_its_size_class() {
        use bytes::Buf as _;
        // An upstream read buffer: filled, then consumed by advancing (never split).
        let mut b = Spare::<BytesMut>::new(LARGE_BUF);
        let ptr = b.as_ptr();
        b.extend_from_slice(&[b'x'; 300]);
        b.advance(300);
        assert!(b.capacity() < LARGE_BUF);
        drop(b);
        // The same allocation, with all of it usable again, for the next one.
        let again = Spare::<BytesMut>::new(LARGE_BUF);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.capacity() >= LARGE_BUF);
        // And a small one is not taken from the large class.
        let small = Spare::<BytesMut>::new(4096);
        assert_ne!(small.as_ptr(), ptr);
    }

    #[test]
    fn header_maps_come_back_empty_with_their_room() {
        let mut m = header_map(10);
        m.insert("x-a", http::HeaderValue::from_static("1"));
        let cap = m.capacity();
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.headers = m;
        drop(Request(parts));
        let again = header_map(1);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
    }

    #[test]
    fn large_or_surplus_vecs_are_freed() {
        let v = vec(100 * 1024);
        let ptr = v.as_ptr();
        give_vec(v);
        let small = vec(10);
        assert_ne!(small.as_ptr(), ptr);
        for _ in 0..KEEP_BYTES / 1024 + 10 {
            give_vec(Vec::with_capacity(1024));
        }
        let (n, bytes) = LISTS.with(|l| {
            let l = l.borrow();
            (l.vecs.items.len(), l.vecs.bytes)
        });
        assert!(
            bytes <= KEEP_BYTES && n >= KEEP_BYTES / 1024 - 1,
            "{n} kept, {bytes} bytes"
        );
    }
}
