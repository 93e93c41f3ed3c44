//! Listeners: bind, accept within the connection limit, and hand each connection to
//! [`connection::serve`].

mod connection;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub use self::connection::InFlight;
use crate::access_log::AccessLog;
use crate::proxy::ListenerContext;
use crate::snapshot::{ListenerSettings, SnapshotStore};

/// A bound listener and its accept task.
pub struct Listener {
    pub settings: ListenerSettings,
    pub local_addr: SocketAddr,
    stop_accepting: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    connections: Arc<Semaphore>,
}

/// Binds `settings.address` and starts accepting.
pub async fn bind(settings: ListenerSettings, store: Arc<SnapshotStore>) -> io::Result<Listener> {
    let socket = TcpListener::bind(settings.address).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "listener `{}`: cannot bind {}: {e}",
                settings.name, settings.address
            ),
        )
    })?;
    let local_addr = socket.local_addr()?;
    let access_log = match &settings.access_log {
        Some(path) => Some(AccessLog::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "listener `{}`: cannot open access log {}: {e}",
                    settings.name,
                    path.display()
                ),
            )
        })?),
        None => None,
    };
    let ctx = Arc::new(ListenerContext {
        settings: settings.clone(),
        store,
        access_log,
    });
    let (stop_accepting, stop_rx) = watch::channel(false);
    let (drain, drain_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let accept_task = tokio::spawn(accept_loop(
        socket,
        ctx,
        connections.clone(),
        stop_rx,
        drain_rx,
    ));
    tracing::info!(listener = %settings.name, address = %local_addr, "listening");
    Ok(Listener {
        settings,
        local_addr,
        stop_accepting,
        drain,
        accept_task,
        connections,
    })
}

impl Listener {
    /// Stops accepting, asks every connection to finish (HTTP/1.1 `Connection: close` after
    /// the current response, HTTP/2 GOAWAY), and waits up to `timeout` for them to close.
    /// Returns how many connections were still open when the wait ended.
    pub async fn drain(self, timeout: Duration) -> usize {
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_task.await;
        let _ = self.drain.send(true);
        let max = self.settings.max_connections as u32;
        let all = self.connections.acquire_many(max);
        match tokio::time::timeout(timeout, all).await {
            Ok(_) => 0,
            Err(_) => self.settings.max_connections - self.connections.available_permits(),
        }
    }
}

async fn accept_loop(
    socket: TcpListener,
    ctx: Arc<ListenerContext>,
    connections: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
) {
    let metrics = &ctx.settings.metrics;
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    metrics.connections_overflow.inc();
                    tracing::debug!(listener = %ctx.settings.name, %peer, "max_connections reached; closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                metrics.connections_total.inc();
                tokio::spawn(connection::serve(
                    ctx.clone(),
                    stream,
                    peer,
                    permit,
                    drain.clone(),
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %ctx.settings.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
