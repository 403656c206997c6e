//! Connection guard (SECURITY H-01, H-07): every accepted connection must send a complete
//! request head within `server.header_read_timeout` of being accepted, and a kept-alive
//! connection with no request in flight is closed after `server.idle_timeout`. At
//! `server.max_connections`, a new client is admitted by closing the connection that has
//! been quiet (silent or idle) the longest.
//!
//! Why here and not in hyper: hyper's HTTP/1 `header_read_timeout` starts at the first byte
//! of a head, so a connection that never sends one is never closed, and HTTP/2 has no such
//! timer at all; a thousand silent sockets would hold every slot and cut every agent off its
//! sidecar. The guard sees what hyper does not: when the service is called (a request head
//! is complete, on either protocol) and when its answer is ready.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The open connections of one listener, so that a flood can be shed.
#[derive(Debug)]
pub struct Connections {
    epoch: Instant,
    next_id: AtomicU64,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

/// One connection's state, shared by its task, its service and the registry.
#[derive(Debug)]
pub struct Conn {
    /// Requests being answered now (HTTP/2: streams).
    in_flight: AtomicUsize,
    /// At least one request head was complete.
    served: AtomicBool,
    /// Milliseconds since the registry's epoch: when the connection was accepted, then when
    /// its last request was answered. Meaningful only while `in_flight` is 0.
    quiet_since: AtomicU64,
    /// Chosen to make room for a new client; set once.
    shed: AtomicBool,
    close: Notify,
}

/// Why a guarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The connection finished on its own (client closed, error, shutdown).
    Finished,
    /// No complete request head within `header_read_timeout` of accept (H-01).
    Silent,
    /// No request for `idle_timeout` after the last answer (H-07).
    Idle,
    /// Closed to admit a new client at `max_connections` (H-07).
    Shed,
}

impl Connections {
    pub fn new(header_read_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            header_read_timeout,
            idle_timeout,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Register a connection accepted now; it leaves the registry when the guard ends.
    /// Enter a new connection in the registry (see [`Connections::guard_registered`]).
    pub fn register(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            quiet_since: AtomicU64::new(self.now_ms()),
            shed: AtomicBool::new(false),
            close: Notify::new(),
        });
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At `max_connections`, with a new client waiting: close the connection that has been
    /// quiet the longest (no request in flight: silent since accept, or idle since its last
    /// answer). Returns false when none can go (every connection is answering a request;
    /// those end within the request deadlines) or one already chosen is still closing.
    ///
    /// Why shed rather than queue: with queueing, whoever holds every slot silently decides
    /// who else gets served; with shedding, a client that sends its request promptly is
    /// always served, because it would take `max_connections` newer arrivals before it is
    /// the oldest quiet connection, and a busy connection is never chosen. The cost falls on
    /// idle keep-alive connections, which clients reopen anyway.
    pub fn shed_one(&self) -> bool {
        let open = self.lock();
        if open.values().any(|c| c.shed.load(Ordering::Acquire)) {
            return false;
        }
        let oldest = open
            .values()
            .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|c| c.quiet_since.load(Ordering::Acquire));
        match oldest {
            Some(c) => {
                c.shed.store(true, Ordering::Release);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// Run `work` (the connection: TLS handshake and HTTP) under the guard: it is dropped,
    /// which closes the socket, when the connection is silent past `header_read_timeout`,
    /// idle past `idle_timeout`, or shed. `work` gets the connection's [`Conn`] to mark
    /// requests with [`Conn::begin`].
    pub async fn guard<F, Fut>(&self, work: F) -> Ended
    where
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (id, conn) = self.register();
        self.guard_registered(id, &conn, work(conn.clone())).await
    }

    /// [`Connections::guard`] in two steps, for a caller that must build the connection's
    /// work (which needs its [`Conn`]) before it can move it into a task: `work` is under the
    /// guard from this call on, and leaves the registry when it ends.
    pub async fn guard_registered(
        &self,
        id: u64,
        conn: &Conn,
        work: impl Future<Output = ()>,
    ) -> Ended {
        let ended = self.watch(conn, work).await;
        self.lock().remove(&id);
        ended
    }

    async fn watch(&self, conn: &Conn, work: impl Future<Output = ()>) -> Ended {
        tokio::pin!(work);
        loop {
            // Re-read each round: a request may have begun or ended since.
            let limit = if conn.served.load(Ordering::Acquire) {
                self.idle_timeout
            } else {
                self.header_read_timeout
            };
            let busy = conn.in_flight.load(Ordering::Acquire) > 0;
            let deadline = if busy {
                // Nothing to time while answering; look again after one more period.
                Instant::now() + limit
            } else {
                self.at(conn.quiet_since.load(Ordering::Acquire)) + limit
            };
            tokio::select! {
                () = &mut work => return Ended::Finished,
                () = conn.close.notified() => return Ended::Shed,
                () = tokio::time::sleep_until(deadline) => {
                    let quiet = conn.in_flight.load(Ordering::Acquire) == 0;
                    let since = self.at(conn.quiet_since.load(Ordering::Acquire));
                    if quiet && Instant::now() >= since + limit {
                        return if conn.served.load(Ordering::Acquire) {
                            Ended::Idle
                        } else {
                            Ended::Silent
                        };
                    }
                }
            }
        }
    }
}

impl Conn {
    /// A request head is complete and its answer is being made; the connection is busy until
    /// the returned guard drops.
    pub fn begin(self: &Arc<Self>, connections: &Arc<Connections>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        InFlight {
            conn: self.clone(),
            connections: connections.clone(),
        }
    }
}

/// A request being answered; dropping it (answer ready, or request abandoned) may make the
/// connection quiet.
#[derive(Debug)]
pub struct InFlight {
    conn: Arc<Conn>,
    connections: Arc<Connections>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The time first, then the count: whoever sees the count at 0 sees this time.
        self.conn
            .quiet_since
            .store(self.connections.now_ms(), Ordering::Release);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    //! Real time, short timeouts: bounds below are exact (never closed early), bounds above
    //! are generous (a loaded machine only makes things later).
    use super::*;

    const HEADER: Duration = Duration::from_millis(100);
    const IDLE: Duration = Duration::from_millis(300);

    fn registry() -> Arc<Connections> {
        Arc::new(Connections::new(HEADER, IDLE))
    }

    #[tokio::test]
    async fn h01_silent_connection_ends_after_header_read_timeout() {
        let c = registry();
        let started = Instant::now();
        let ended = c.guard(|_| std::future::pending::<()>()).await;
        assert_eq!(ended, Ended::Silent);
        assert!(started.elapsed() >= HEADER);
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn h07_idle_connection_ends_after_idle_timeout_counted_from_its_last_answer() {
        let c = registry();
        let busy_for = Duration::from_millis(500);
        let answered = Arc::new(Mutex::new(None));
        let reg = c.clone();
        let at = answered.clone();
        let ended = c
            .guard(|conn| async move {
                let req = conn.begin(&reg);
                // Busy past both timeouts: never closed while answering.
                tokio::time::sleep(busy_for).await;
                drop(req);
                *at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(Instant::now());
                std::future::pending::<()>().await;
            })
            .await;
        assert_eq!(ended, Ended::Idle);
        let answered = answered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .expect("the request was answered");
        assert!(answered.elapsed() >= IDLE - Duration::from_millis(2));
    }

    #[tokio::test]
    async fn h07_finished_connection_ends_as_finished() {
        let c = registry();
        assert_eq!(c.guard(|_| async {}).await, Ended::Finished);
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn h07_shedding_picks_the_longest_quiet_and_never_a_busy_connection() {
        // Long timeouts: only shedding ends a connection here.
        let c = Arc::new(Connections::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let reg = c.clone();
        // The oldest connection is busy for the whole test.
        let busy = tokio::spawn({
            let c = c.clone();
            async move {
                c.guard(|conn| async move {
                    let _req = conn.begin(&reg);
                    let _ = tx.send(());
                    std::future::pending::<()>().await;
                })
                .await
            }
        });
        rx.await.expect("busy connection registered");
        let quiet = |c: &Arc<Connections>| {
            let c = c.clone();
            tokio::spawn(async move { c.guard(|_| std::future::pending::<()>()).await })
        };
        let older = quiet(&c);
        // quiet_since has millisecond resolution.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let newer = quiet(&c);
        while c.len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(c.shed_one());
        assert!(!c.shed_one(), "one is already on its way out");
        assert_eq!(older.await.expect("task"), Ended::Shed);
        assert!(c.shed_one());
        assert_eq!(newer.await.expect("task"), Ended::Shed);
        assert!(!c.shed_one(), "only a busy connection is left");
        assert!(!busy.is_finished());
        busy.abort();
    }
}
