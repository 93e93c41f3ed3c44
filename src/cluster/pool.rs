//! An endpoint's upstream connections: idle HTTP/1.1 ones and the shared HTTP/2 one. The
//! state only; `upstream` opens, uses and returns the connections.

use std::sync::atomic::AtomicU8;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};

use crate::body::Body;

struct IdleConn {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// An endpoint's connections: idle HTTP/1.1 ones (most recently used first), or one h2c one.
pub struct Pool {
    idle: Mutex<Vec<IdleConn>>,
    /// The shared h2c connection, numbered so that a request that saw it fail replaces that
    /// one only, not a fresh one another request has just opened.
    pub(crate) h2: Mutex<Option<(u64, http2::SendRequest<Body>)>>,
    pub(crate) h2_opened: std::sync::atomic::AtomicU64,
    pub(crate) h2_connecting: tokio::sync::Mutex<()>,
    /// For an `auto` cluster, what the endpoint chose by ALPN: [`UNKNOWN`], [`HTTP1`] or
    /// [`HTTP2`].
    pub(crate) chosen: AtomicU8,
}

pub(crate) const UNKNOWN: u8 = 0;
pub(crate) const HTTP1: u8 = 1;
pub(crate) const HTTP2: u8 = 2;

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_opened: std::sync::atomic::AtomicU64::new(0),
            h2_connecting: tokio::sync::Mutex::new(()),
            chosen: AtomicU8::new(UNKNOWN),
        }
    }

    /// Idle HTTP/1.1 connections right now (for `/clusters` and tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    /// Drops idle connections unused for longer than `max_idle`, which closes them.
    pub fn close_idle_older_than(&self, max_idle: Duration) {
        self.idle
            .lock()
            .expect("pool lock")
            .retain(|c| c.since.elapsed() < max_idle && !c.sender.is_closed());
    }

    pub(crate) fn put_h1(&self, sender: http1::SendRequest<Body>) {
        self.idle.lock().expect("pool lock").push(IdleConn {
            sender,
            since: Instant::now(),
        });
    }

    /// The most recently used idle connection that is still open, and how long it was idle.
    pub(crate) async fn take_h1(
        &self,
        max_idle: Duration,
    ) -> Option<(http1::SendRequest<Body>, Duration)> {
        loop {
            let conn = self.idle.lock().expect("pool lock").pop()?;
            let idle = conn.since.elapsed();
            if conn.sender.is_closed() || idle >= max_idle {
                continue;
            }
            let mut sender = conn.sender;
            if sender.ready().await.is_ok() {
                return Some((sender, idle));
            }
        }
    }
}
