//! Bulkhead: a multi-tenant reverse-proxy gateway.
//!
//! A request goes accept ([`server`]) → snapshot ([`snapshot`]) → resolve ([`tenant`])
//! → admit → route → rewrite ([`headers`]) → forward ([`upstream`]), all in
//! [`proxy`]; every refusal is a [`error::ProxyError`] mapped to a response in one place.

#![forbid(unsafe_code)]
// `unwrap` on anything a client or upstream controls is a bug: use `expect` with the
// reason it cannot fail, or handle the error. Tests may unwrap freely.
#![warn(clippy::unwrap_used)]

pub mod admin;
pub mod body;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod error;
pub mod file;
pub mod h1;
pub mod h2;
pub mod headers;
pub mod jwt;
pub mod limits;
pub mod lint;
pub mod metrics;
pub mod periods;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod scripts;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod tenant;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod usage;
pub mod watch;

pub use config::{Config, ConfigError};
pub use server::RunningGateway;

/// Set once by the binary (its global allocator, `src/allocator.rs`): gives what the
/// allocator holds freed back to the system. A worker calls it, on its own thread,
/// when every connection it has open is parked between requests (checked four times a
/// second): the memory a burst freed — 10,000 connections' first requests, say — is
/// then returned while the worker idles, not kept resident until its next burst of
/// work. Unset (tests, embedders), nothing is called.
pub static RETURN_FREED_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// A seeded xorshift64 generator: for unit tests that feed random input (the same
/// sequence on every run), and the cluster sync's jitter. `seed` must not be 0.
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
