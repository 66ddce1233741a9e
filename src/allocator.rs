//! The global allocator: mimalloc, asked for an alignment only when a type needs more
//! than every mimalloc block has anyway.
//!
//! `mimalloc::MiMalloc` hands every allocation to `mi_malloc_aligned`, whose fast path
//! covers blocks of up to 1 KiB only; a larger block whose size is not a power of two
//! takes the slow path that over-allocates and aligns by hand, about 500 instructions
//! where `mi_malloc` takes about 100. Under the load benchmark that was the boxed
//! request future, most read buffers and the request's header map: 7.7 % of the
//! proxy's user-space instructions per request (callgrind, BENCHMARKS.md).
//!
//! Every mimalloc block is a whole number of 8-byte words in a page that starts
//! aligned, so a plain `mi_malloc` block is 8-byte aligned; only types asking for
//! more (tokio's 128-byte aligned task cells, for one) go through the aligned entry
//! points. All blocks are freed by `mi_free` either way.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has.
const WORD: usize = 8;

pub struct MiMalloc;

// SAFETY: every block comes from mimalloc with at least the layout's size and
// alignment (plain blocks are word-aligned, and only layouts asking for at most a
// word take them), and every block goes back to mimalloc through `mi_free` or
// mimalloc's own reallocation, which accept both kinds.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        // SAFETY: plain C allocation calls; a null result is passed on as failure.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(size).cast()
            } else {
                mi::mi_malloc_aligned(size, layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        // SAFETY: as `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(size).cast()
            } else {
                mi::mi_zalloc_aligned(size, layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from
        // mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc with `layout` (the caller's contract); the
        // new block keeps the alignment the layout asks for.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Gives back to the system what the calling thread's heap and mimalloc's arenas hold
/// freed (`mi_collect(true)`), at once rather than after mimalloc's purge delay. For a
/// worker with nothing to do (see [`bulkhead::RETURN_FREED_MEMORY`]): memory freed at
/// the end of a burst otherwise stays resident until the worker's next allocations
/// find it due, which an idle worker does not make.
pub fn give_back() {
    // SAFETY: a plain C call with nothing to uphold.
    unsafe { mi::mi_collect(true) }
}
