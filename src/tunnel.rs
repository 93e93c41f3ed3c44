//! Upgraded connections (WebSocket and other allowed upgrades): the client's and the
//! upstream's connections spliced together, still counted as a connection on both sides,
//! closed when idle or when the listener's drain timeout passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::activity::{Active, Activity};
use crate::downstream::ConnectionHold;
use crate::upstream::ConnectionSlot;

/// What bounds a tunnel on the client's side.
pub struct Limits {
    /// The listener's `idle_timeout`: no byte either way for this long closes the tunnel.
    pub idle_timeout: Option<Duration>,
    /// The client connection's listener slot and gauge, and the drain signal.
    pub connection: ConnectionHold,
}

/// Splices the two upgraded connections in a task of their own once both upgrades
/// complete. The tunnel holds the client connection's listener slot and the upstream
/// connection's cluster slot until it closes.
pub fn spawn(
    client: OnUpgrade,
    upstream: OnUpgrade,
    upstream_slot: Arc<ConnectionSlot>,
    limits: Limits,
    addr: SocketAddr,
) {
    tokio::spawn(async move {
        // Held for the task's whole life: the tunnel is these two connections.
        let (_upstream_slot, limits) = (upstream_slot, limits);
        let (client_io, upstream_io) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%addr, %error, "upgrade did not complete");
                return;
            }
        };
        let activity = Arc::new(Activity::new());
        let mut a = Active::new(TokioIo::new(client_io), activity.clone());
        let mut b = Active::new(TokioIo::new(upstream_io), activity.clone());
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        let closing = limits.connection.closing();
        tokio::pin!(closing);
        let idle = limits.idle_timeout;
        let every = idle.map_or(Duration::from_secs(3600), |t| {
            (t / 4).clamp(Duration::from_millis(20), Duration::from_secs(5))
        });
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                result = &mut copy => {
                    if let Err(error) = result {
                        tracing::debug!(%addr, %error, "upgraded connection ended");
                    }
                    break;
                }
                () = &mut closing => {
                    tracing::debug!(%addr, "drain timeout reached; closing the tunnel");
                    break;
                }
                _ = ticks.tick(), if idle.is_some() => {
                    if idle.is_some_and(|t| activity.idle_for() >= t) {
                        tracing::debug!(%addr, "tunnel idle; closing it");
                        break;
                    }
                }
            }
        }
        // Both connections close as the task ends, and with them go the slots the task holds
        // (`upstream_slot` and the client connection's in `limits`).
    });
}
