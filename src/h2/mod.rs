//! The gateway's own HTTP/2 server (RFC 9113) for client connections: one task per
//! connection that reads frames, runs each stream's request path and writes responses
//! without a task per stream (`conn.rs`); HPACK (`hpack.rs`), sending literals and
//! indexing only what repeats. hyper's server remains behind `BULKHEAD_H2=hyper`.

mod body;
mod conn;
mod frame;
mod head;
pub mod hpack;
mod huffman;

pub use body::{RecvBody, StreamReset};
pub use conn::{serve, Config, Ended, Handler};

/// On a request whose header list was over the advertised limit (`size` of
/// `limit`, counted as RFC 9113 §6.5.2 counts): the service answers it 431.
#[derive(Clone, Copy, Debug)]
pub struct TooLarge {
    pub size: usize,
    pub limit: usize,
}

/// Whether this server (rather than hyper's) serves HTTP/2 connections.
pub fn enabled() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("BULKHEAD_H2").map_or(true, |v| v != "hyper"));
    *ON
}
