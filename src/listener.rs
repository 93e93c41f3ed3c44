//! Listeners: bind, accept within the connection limit, and hand each connection to
//! [`connection::serve`]. A reload may change a listener's settings in place (new
//! connections get them; open ones finish on theirs) or drain it.

mod connection;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub use self::connection::InFlight;
use crate::access_log::AccessLog;
use crate::proxy::ListenerContext;
use crate::snapshot::{ListenerSettings, SnapshotStore};

/// A bound socket with everything needed to start accepting; binding is the step that can
/// fail, so a reload binds every new address before it changes anything.
pub struct Prepared {
    socket: TcpListener,
    ctx: Arc<ListenerContext>,
    local_addr: SocketAddr,
}

/// A listener that is accepting.
pub struct Listener {
    pub local_addr: SocketAddr,
    ctx: watch::Sender<Arc<ListenerContext>>,
    stop_accepting: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    connections: Arc<Semaphore>,
    max_connections: Arc<AtomicUsize>,
}

/// Binds `settings.address` and opens the access log.
pub async fn prepare(
    settings: ListenerSettings,
    store: Arc<SnapshotStore>,
) -> io::Result<Prepared> {
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
    let ctx = context(settings, store, None)?;
    Ok(Prepared {
        socket,
        ctx,
        local_addr,
    })
}

fn context(
    settings: ListenerSettings,
    store: Arc<SnapshotStore>,
    previous: Option<&ListenerContext>,
) -> io::Result<Arc<ListenerContext>> {
    let access_log = match &settings.access_log {
        None => None,
        Some(path) => match previous {
            Some(p) if p.settings.access_log.as_ref() == Some(path) => p.access_log.clone(),
            _ => Some(AccessLog::open(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "listener `{}`: cannot open access log {}: {e}",
                        settings.name,
                        path.display()
                    ),
                )
            })?),
        },
    };
    Ok(Arc::new(ListenerContext {
        settings,
        store,
        access_log,
    }))
}

impl Prepared {
    /// Starts accepting.
    pub fn start(self) -> Listener {
        let settings = &self.ctx.settings;
        tracing::info!(listener = %settings.name, address = %self.local_addr, "listening");
        let max = settings.max_connections;
        let (ctx, ctx_rx) = watch::channel(self.ctx);
        let (stop_accepting, stop_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(false);
        let connections = Arc::new(Semaphore::new(max));
        let accept_task = tokio::spawn(accept_loop(
            self.socket,
            ctx_rx,
            connections.clone(),
            stop_rx,
            drain_rx,
        ));
        Listener {
            local_addr: self.local_addr,
            ctx,
            stop_accepting,
            drain,
            accept_task,
            connections,
            max_connections: Arc::new(AtomicUsize::new(max)),
        }
    }
}

impl Listener {
    pub fn settings(&self) -> ListenerSettings {
        self.ctx.borrow().settings.clone()
    }

    /// Applies new settings for the same address: connections accepted from now on use
    /// them; open connections finish on the ones they started with.
    pub fn update(&self, settings: ListenerSettings, store: Arc<SnapshotStore>) -> io::Result<()> {
        let new_max = settings.max_connections;
        let ctx = context(settings, store, Some(&self.ctx.borrow()))?;
        let old_max = self.max_connections.swap(new_max, Ordering::Relaxed);
        if new_max > old_max {
            self.connections.add_permits(new_max - old_max);
        } else {
            self.connections.forget_permits(old_max - new_max);
        }
        self.ctx.send_replace(ctx);
        Ok(())
    }

    /// Stops accepting (new connections are refused), asks every open connection to finish
    /// (HTTP/1.1 `Connection: close` after the response in progress, HTTP/2 GOAWAY), and
    /// waits up to `timeout` for them to close. Returns how many were still open then.
    pub async fn drain(self, timeout: Duration) -> usize {
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_task.await;
        let _ = self.drain.send(true);
        let max = self.max_connections.load(Ordering::Relaxed);
        let all = self.connections.acquire_many(max as u32);
        match tokio::time::timeout(timeout, all).await {
            Ok(_) => 0,
            Err(_) => max.saturating_sub(self.connections.available_permits()),
        }
    }
}

async fn accept_loop(
    socket: TcpListener,
    ctx: watch::Receiver<Arc<ListenerContext>>,
    connections: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = socket.accept() => accepted,
        };
        let ctx = ctx.borrow().clone();
        let metrics = &ctx.settings.metrics;
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    metrics.connections_overflow.inc();
                    tracing::debug!(listener = %ctx.settings.name, %peer, "max_connections reached; closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                metrics.connections_total.inc();
                tokio::spawn(connection::serve(ctx, stream, peer, permit, drain.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %ctx.settings.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
