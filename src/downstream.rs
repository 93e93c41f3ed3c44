//! A downstream connection's shared state, which its requests hold: how many are in flight
//! (for the idle and header timeouts), the connection's listener slot, and the listener's
//! phase. The listener serves connections; the proxy holds a request's [`InFlight`] and,
//! for an upgraded tunnel, a [`ConnectionHold`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::watch;

use crate::connection_limit::ConnectionPermit;

/// Where a listener's connections are in its life; they watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Finish what is in progress, then close (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY).
    Draining,
    /// The drain timeout passed: close now, upgraded tunnels included.
    Closing,
}

/// Request boundaries on one connection, for the header and idle timeouts; and the
/// connection's place in its listener's count, held until the connection and any upgraded
/// tunnel made from it have both closed.
pub(crate) struct ConnState {
    epoch: Instant,
    pub(crate) in_flight: AtomicU32,
    /// Milliseconds since `epoch` (+1) when the current request's first byte arrived; 0: none.
    head_started: AtomicU64,
    /// Milliseconds since `epoch` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `epoch` (+1) since when writes to the client have been refused
    /// (its socket full: the client stopped reading); 0: writes are going through.
    write_blocked_since: AtomicU64,
    /// Milliseconds since `epoch` (+1) when bytes last arrived from the client.
    last_read: AtomicU64,
    _permit: ConnectionPermit,
    /// `remora_downstream_connections_active`, decreased when the state goes.
    gauge: IntGauge,
    phase: watch::Receiver<Phase>,
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl ConnState {
    /// A new connection's state; `gauge` was raised for it and is lowered when it goes.
    pub(crate) fn new(
        permit: ConnectionPermit,
        gauge: IntGauge,
        phase: watch::Receiver<Phase>,
    ) -> ConnState {
        ConnState {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            last_read: AtomicU64::new(0),
            _permit: permit,
            gauge,
            phase,
        }
    }

    pub(crate) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Bytes arrived: with nothing in flight, they start a new request head.
    pub(crate) fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(self.now(), Ordering::Relaxed);
        }
    }

    pub(crate) fn head_overdue(&self, limit: Duration) -> bool {
        let started = self.head_started.load(Ordering::Relaxed);
        started != 0 && self.now() - started > limit.as_millis() as u64
    }

    /// A write to the client was refused (`blocked`) or went through.
    pub(crate) fn on_write(&self, blocked: bool) {
        if !blocked {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        } else if self.write_blocked_since.load(Ordering::Relaxed) == 0 {
            self.write_blocked_since
                .store(self.now(), Ordering::Relaxed);
        }
    }

    /// Bytes arrived from the client.
    pub(crate) fn on_bytes_in(&self) {
        self.last_read.store(self.now(), Ordering::Relaxed);
    }

    /// How long the client has taken nothing written to it and sent nothing either (a client
    /// still uploading while it leaves the response unread is making progress).
    pub(crate) fn write_blocked_for(&self) -> Duration {
        let since = self.write_blocked_since.load(Ordering::Relaxed);
        if since == 0 {
            return Duration::ZERO;
        }
        let since = since.max(self.last_read.load(Ordering::Relaxed));
        Duration::from_millis(self.now().saturating_sub(since))
    }

    pub(crate) fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        Duration::from_millis(self.now().saturating_sub(since))
    }
}

/// Marks a request in flight on its connection until dropped (when its response is done).
pub struct InFlight(Arc<ConnState>);

impl InFlight {
    pub(crate) fn begin(state: &Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.head_started.store(0, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl InFlight {
    /// Keeps the connection counted after its HTTP exchange is over (an upgraded tunnel).
    pub fn hold_connection(&self) -> ConnectionHold {
        ConnectionHold(self.0.clone())
    }
}

/// A connection's listener slot and gauge, held by an upgraded tunnel, which also learns
/// from it when the listener's drain timeout has passed.
pub struct ConnectionHold(Arc<ConnState>);

impl ConnectionHold {
    /// Resolves when the listener closes its remaining connections (drain timeout) or is gone.
    pub async fn closing(&self) {
        let mut phase = self.0.phase.clone();
        let _ = phase.wait_for(|p| *p == Phase::Closing).await;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.store(self.0.now(), Ordering::Relaxed);
        }
    }
}
