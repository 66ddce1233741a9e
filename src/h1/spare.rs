//! Buffers a worker thread keeps between requests. A connection holds no buffer
//! while it waits for its next request (that is what keeps idle connections small),
//! so without these every request would allocate and free its read buffer, the
//! request head it writes upstream, the upstream read buffer and the head it writes
//! back. Each worker runs on its own thread, so the lists are thread-local and need
//! no lock; they are bounded in total bytes and in the size of a buffer they keep.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use bytes::BytesMut;

/// Bytes of buffers of each kind kept per thread: a few dozen, for most of the
/// exchanges in progress at one moment under the load benchmark's 64 connections.
/// Kept buffers count against every idle connection's share of memory: lists of 2 MiB
/// saved two more allocations per request but cost 0.2 KiB per connection in the idle
/// benchmark (10,000 connections). Past this, buffers are freed as before.
const KEEP_BYTES: usize = 256 * 1024;
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

    fn push(&mut self, item: T, cap: usize) {
        if self.bytes + cap <= KEEP_BYTES {
            self.bytes += cap;
            self.items.push(item);
        }
    }
}

#[derive(Default)]
struct Lists {
    bufs: List<BytesMut>,
    vecs: List<Vec<u8>>,
}

thread_local! {
    static LISTS: RefCell<Lists> = RefCell::new(Lists::default());
}

/// An empty buffer with room for at least `size` bytes.
fn buf(size: usize) -> BytesMut {
    let kept = LISTS.with(|l| l.borrow_mut().bufs.pop(BytesMut::capacity));
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
fn give_buf(mut b: BytesMut) {
    let cap = b.capacity();
    if cap == 0 || cap > MAX_KEPT {
        return;
    }
    b.clear();
    // Succeeds only when this handle is the allocation's sole owner; it then has its
    // whole capacity back in front.
    if !b.try_reclaim(cap) {
        return;
    }
    let cap = b.capacity();
    LISTS.with(|l| l.borrow_mut().bufs.push(b, cap));
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
    LISTS.with(|l| l.borrow_mut().vecs.push(v, cap));
}

/// What the thread's lists keep, and how each kind goes back.
pub(super) trait Kept: Default {
    fn give_back(self);
}

impl Kept for BytesMut {
    fn give_back(self) {
        give_buf(self)
    }
}

impl Kept for Vec<u8> {
    fn give_back(self) {
        give_vec(self)
    }
}

/// A buffer from the thread's lists that goes back to them when dropped.
#[derive(Default)]
pub(super) struct Spare<T: Kept>(T);

/// A read buffer.
pub(super) type Buf = Spare<BytesMut>;
/// A write buffer.
pub(super) type Scratch = Spare<Vec<u8>>;

impl Spare<BytesMut> {
    pub(super) fn new(size: usize) -> Buf {
        Spare(buf(size))
    }

    /// The bytes, for keeps (the buffer is not given back).
    pub(super) fn take(&mut self) -> BytesMut {
        std::mem::take(&mut self.0)
    }
}

impl Spare<Vec<u8>> {
    pub(super) fn new(size: usize) -> Scratch {
        Spare(vec(size))
    }
}

impl<T: Kept> Deref for Spare<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Kept> DerefMut for Spare<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: Kept> Drop for Spare<T> {
    fn drop(&mut self) {
        std::mem::take(&mut self.0).give_back();
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
        give_buf(b);
        // `head` still points into the allocation: it was not kept.
        let other = buf(4096);
        assert_ne!(other.as_ptr(), ptr);
        drop(head);
        give_buf(other);

        let mut b = buf(4096);
        let ptr = b.as_ptr();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        drop(b.split_to(10).freeze());
        give_buf(b);
        let again = buf(4096);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty() && again.capacity() >= 4096);
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
