//! A connection limit (a listener's, the admin server's): a count of open connections against a maximum that a
//! reload may lower below the count (new connections then wait for enough to close).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Open connections against `max_connections`.
pub struct ConnectionLimit {
    active: AtomicUsize,
    max: AtomicUsize,
    /// Woken whenever the last connection closes.
    idle: Notify,
}

/// One open connection's place in the count, given back when dropped.
pub struct ConnectionPermit {
    limit: Arc<ConnectionLimit>,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            idle: Notify::new(),
        }
    }

    /// A place for one more connection, or `None` at the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let max = self.max.load(Ordering::Acquire);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionPermit {
            limit: self.clone(),
        })
    }

    /// A new maximum; connections already open above it stay open.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let closed = self.idle.notified();
            tokio::pin!(closed);
            // Registered before the check, so a close in between is not missed.
            closed.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if self.limit.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.limit.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_maximum_holds_new_connections_until_enough_close() {
        let limit = Arc::new(ConnectionLimit::new(3));
        let open: Vec<_> = (0..3).map(|_| limit.try_acquire().unwrap()).collect();
        assert!(limit.try_acquire().is_none());
        limit.set_max(1);
        let mut open = open.into_iter();
        drop(open.next());
        assert!(limit.try_acquire().is_none(), "2 open, max 1");
        drop(open.next());
        assert!(limit.try_acquire().is_none(), "1 open, max 1");
        drop(open.next());
        assert!(limit.try_acquire().is_some());
    }

    #[tokio::test]
    async fn all_closed_waits_for_the_last_connection() {
        let limit = Arc::new(ConnectionLimit::new(usize::MAX));
        let permit = limit.try_acquire().unwrap();
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.all_closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(permit);
        waiter.await.unwrap();
    }
}
