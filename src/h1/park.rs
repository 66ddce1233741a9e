//! Idle keep-alive connections without a task. A new connection, and one that has
//! waited for its next request for longer than `h1::LINGER`, is parked: its socket,
//! its context and the worker's connection guard go into a slot of the worker's lot,
//! and the slot itself is the waker registered for the socket's readability. When the client sends something the event loop wakes the
//! slot, which spawns a task for the connection; until then the connection costs the
//! slot (about 100 bytes) and tokio's registration, not a task with its future.
//! Every second (or quarter of `header_read_timeout`, if shorter) the lot closes
//! connections idle for longer than `header_read_timeout`; on shutdown it closes them
//! all.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Handoff;
use crate::proxy::ConnCtx;
use crate::server::ConnGuard;

/// A client connection between requests.
pub struct Conn {
    pub stream: TcpStream,
    pub ctx: Arc<ConnCtx>,
    /// Counts the connection as open until it closes (graceful shutdown waits for it).
    pub guard: ConnGuard,
    /// No request has been read yet (the HTTP/2 preface is looked for).
    pub fresh: bool,
}

/// Starts hyper on a connection the fast path hands over.
pub type ToHyper = Box<
    dyn Fn(Handoff, Arc<ConnCtx>, ConnGuard) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// One worker's fast path: its parked connections and its settings.
pub struct Worker {
    lot: Mutex<Lot>,
    handle: tokio::runtime::Handle,
    pub(super) header_read_timeout: Duration,
    pub(super) max_head: usize,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) to_hyper: ToHyper,
}

#[derive(Default)]
struct Lot {
    slots: Vec<Option<Arc<Slot>>>,
    free: Vec<usize>,
}

struct Slot {
    key: usize,
    worker: Arc<Worker>,
    parked: Mutex<Option<(Conn, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    /// Must be called inside the worker's runtime.
    pub fn new(
        header_read_timeout: Duration,
        max_head: usize,
        shutdown: watch::Receiver<bool>,
        to_hyper: ToHyper,
    ) -> Arc<Worker> {
        let w = Arc::new(Worker {
            lot: Mutex::default(),
            handle: tokio::runtime::Handle::current(),
            header_read_timeout,
            max_head,
            shutdown,
            to_hyper,
        });
        tokio::spawn(sweep(Arc::downgrade(&w)));
        w
    }

    /// A new connection: parked until it sends its first bytes.
    pub fn accept(self: &Arc<Self>, conn: Conn) {
        if let Some(conn) = self.park(conn, Instant::now()) {
            self.spawn(conn);
        }
    }

    /// Parks `conn`, idle since `since`, until its socket turns readable; gives it
    /// back when it already is.
    pub(super) fn park(self: &Arc<Self>, conn: Conn, since: Instant) -> Option<Conn> {
        if *self.shutdown.borrow() {
            return None;
        }
        let key = {
            let mut lot = lock(&self.lot);
            match lot.free.pop() {
                Some(k) => k,
                None => {
                    lot.slots.push(None);
                    lot.slots.len() - 1
                }
            }
        };
        let slot = Arc::new(Slot {
            key,
            worker: self.clone(),
            parked: Mutex::new(None),
        });
        let waker = Waker::from(slot.clone());
        if conn
            .stream
            .poll_read_ready(&mut Context::from_waker(&waker))
            .is_ready()
        {
            lock(&self.lot).free.push(key);
            return Some(conn);
        }
        *lock(&slot.parked) = Some((conn, since));
        lock(&self.lot).slots[key] = Some(slot);
        None
    }

    /// How many connections are parked (about: one being parked counts already).
    pub fn parked(&self) -> usize {
        let lot = lock(&self.lot);
        lot.slots.len() - lot.free.len()
    }

    fn spawn(self: &Arc<Self>, conn: Conn) {
        self.handle.spawn(super::serve(self.clone(), conn));
    }

    /// Closes the parked connections idle since before `cutoff` (all of them when
    /// `None`). Returns how many are left.
    fn close_idle(&self, cutoff: Option<Instant>) -> usize {
        let mut closed = Vec::new();
        let left = {
            let mut lot = lock(&self.lot);
            let Lot { slots, free } = &mut *lot;
            let mut left = 0;
            for (key, entry) in slots.iter_mut().enumerate() {
                let Some(slot) = entry else { continue };
                let mut parked = lock(&slot.parked);
                let expired = parked
                    .as_ref()
                    .is_some_and(|(_, since)| cutoff.is_none_or(|c| *since <= c));
                if expired {
                    closed.extend(parked.take());
                    drop(parked);
                    *entry = None;
                    free.push(key);
                } else {
                    left += 1;
                }
            }
            left
        };
        // Closed outside the lock: dropping a socket deregisters it.
        if !closed.is_empty() {
            tracing::debug!(closed = closed.len(), "closing idle keep-alive connections");
        }
        drop(closed);
        left
    }
}

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some((conn, _)) = lock(&self.parked).take() else {
            return;
        };
        {
            let mut lot = lock(&self.worker.lot);
            if let Some(entry) = lot.slots.get_mut(self.key) {
                *entry = None;
            }
            lot.free.push(self.key);
        }
        self.worker.spawn(conn);
    }
}

/// Periodically closes connections idle for longer than `header_read_timeout`; on
/// shutdown, closes every parked connection.
async fn sweep(worker: std::sync::Weak<Worker>) {
    let every = worker.upgrade().map_or(Duration::from_secs(1), |w| {
        (w.header_read_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    });
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Some(mut shutdown) = worker.upgrade().map(|w| w.shutdown.clone()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        let Some(w) = worker.upgrade() else { return };
        if *w.shutdown.borrow() {
            w.close_idle(None);
            return;
        }
        if let Some(cutoff) = Instant::now().checked_sub(w.header_read_timeout) {
            w.close_idle(Some(cutoff));
        }
    }
}
