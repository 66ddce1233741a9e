//! The renders of `GET /metrics`: shared between the scrapes that wait at the same
//! time, run on the blocking pool, and capped in number.
//!
//! A render of a config of 10,000 tenants is about 9 MB and takes a while; an answer
//! is held until its client has taken it, which a slow client may stretch for as long
//! as it takes a piece every `header_read_timeout`. So:
//!
//! - One render runs at a time. A scrape that arrives while none runs starts one; one
//!   that arrives while one runs waits for the next, which starts once the running one
//!   is done, and every scrape waiting by then shares its bytes (`Bytes` is counted by
//!   reference). A render therefore starts after every scrape it answers arrived: each
//!   sees every count made before it was sent. Nothing is cached over time.
//! - It runs on the blocking pool: the admin thread keeps answering health checks,
//!   readiness and the other streams of a connection meanwhile.
//! - At most [`MAX_RENDERS`] renders are alive at once, counting the one being made
//!   and each one some answer still holds (its bytes go when the last answer holding
//!   them has been taken or dropped). A render beyond them waits for one to go, for
//!   `header_read_timeout` at most; its scrapes are then refused with 503
//!   `too_many_scrapes` and `Retry-After`. Scrapes that take their answers (Prometheus,
//!   curl) hold a render for as long as it takes to send it; only clients that keep
//!   answers waiting, at different times, hold more than one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::server::Shared;

/// Renders of `/metrics` alive at once: 8 × 9 MB for a config of 10,000 tenants.
/// Two Prometheus servers and an operator's curl need three.
pub(super) const MAX_RENDERS: usize = 8;

/// What a scrape gets.
#[derive(Clone)]
pub(super) enum Scrape {
    /// The exposition, shared with the other scrapes of the same render.
    Text(Bytes),
    /// [`MAX_RENDERS`] renders stayed alive for `header_read_timeout`.
    Busy,
    /// The render failed (it panicked); logged.
    Failed,
}

/// The renders of one admin listener.
pub(super) struct Renders {
    state: Mutex<State>,
    /// One permit per render alive, held by the render's bytes.
    alive: Arc<Semaphore>,
    /// How long a render waits for one of [`MAX_RENDERS`] to go.
    wait: Duration,
    /// The length of the last render: the next one's buffer is sized from it.
    last_len: AtomicUsize,
}

struct State {
    /// A render is running (or waiting for a permit).
    running: bool,
    /// The render to run next, when one runs: the scrapes that arrived since it
    /// started wait on it.
    next: Option<watch::Sender<Option<Scrape>>>,
}

/// A render's bytes, holding its permit until the last answer made of them is gone.
struct Rendered {
    text: Box<[u8]>,
    _alive: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Rendered {
    fn as_ref(&self) -> &[u8] {
        &self.text
    }
}

impl Renders {
    pub(super) fn new(wait: Duration) -> Arc<Renders> {
        Arc::new(Renders {
            state: Mutex::new(State {
                running: false,
                next: None,
            }),
            alive: Arc::new(Semaphore::new(MAX_RENDERS)),
            wait,
            last_len: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exposition for a scrape that arrived now: from a render that starts now, or
    /// from the next one if one is running.
    pub(super) async fn scrape(self: &Arc<Self>, shared: &Arc<Shared>) -> Scrape {
        let (mut done, start) = {
            let mut s = self.lock();
            if s.running {
                let next = s.next.get_or_insert_with(|| watch::channel(None).0);
                (next.subscribe(), None)
            } else {
                s.running = true;
                let (tx, rx) = watch::channel(None);
                (rx, Some(tx))
            }
        };
        if let Some(tx) = start {
            tokio::spawn(Arc::clone(self).run(tx, Arc::clone(shared)));
        }
        let scrape = match done.wait_for(Option::is_some).await {
            Ok(scrape) => scrape.clone().unwrap_or(Scrape::Failed),
            // The runner went away (the runtime is shutting down).
            Err(_) => Scrape::Failed,
        };
        scrape
    }

    /// Runs renders one after another while scrapes wait for a next one.
    async fn run(self: Arc<Self>, mut tx: watch::Sender<Option<Scrape>>, shared: Arc<Shared>) {
        let mut running = Running {
            renders: &self,
            armed: true,
        };
        loop {
            tx.send_replace(Some(self.render(&shared).await));
            let mut s = self.lock();
            match s.next.take() {
                Some(next) => tx = next,
                None => {
                    s.running = false;
                    running.armed = false;
                    return;
                }
            }
        }
    }

    async fn render(&self, shared: &Arc<Shared>) -> Scrape {
        let alive = match tokio::time::timeout(self.wait, self.alive.clone().acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Scrape::Busy,
        };
        let shared = Arc::clone(shared);
        let hint = self.last_len.load(Ordering::Relaxed);
        let rendered = tokio::task::spawn_blocking(move || {
            let reloads = crate::metrics::ReloadCounters {
                succeeded: shared.reload.succeeded(),
                failed: shared.reload.failed(),
                last_success: shared.reload.last_success(),
            };
            // Sized from the last render, and trimmed: the bytes are held for as long
            // as a client takes to read them.
            let text = crate::metrics::render_with_capacity(
                &shared.snapshot.load_full(),
                &reloads,
                hint + hint / 16,
            );
            Bytes::from_owner(Rendered {
                text: text.into_boxed_slice(),
                _alive: alive,
            })
        })
        .await;
        match rendered {
            Ok(text) => {
                self.last_len.store(text.len(), Ordering::Relaxed);
                Scrape::Text(text)
            }
            Err(e) => {
                tracing::error!(error = %e, "the /metrics render failed");
                Scrape::Failed
            }
        }
    }
}

/// Lets the next scrape start a render again should the runner be dropped (the
/// runtime shutting down) before it has finished; the scrapes waiting for a next
/// render are then answered as failed.
struct Running<'a> {
    renders: &'a Renders,
    armed: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut s = self.renders.lock();
            s.running = false;
            s.next = None;
        }
    }
}
