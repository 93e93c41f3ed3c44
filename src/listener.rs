//! Listeners: bind, accept within the connection limit, and hand each connection to
//! [`connection::serve`]. A reload may change a listener's settings in place (new
//! connections get them; open ones keep their connection limits and serve their next
//! requests with the new routing) or drain it.

mod connection;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::AccessLog;
pub use crate::connection_limit::{ConnectionLimit, ConnectionPermit};
pub use crate::downstream::Phase;
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
    /// The settings new connections get and every request reads.
    ctx: Arc<ArcSwap<ListenerContext>>,
    stop_accepting: watch::Sender<bool>,
    phase: watch::Sender<Phase>,
    accept_task: JoinHandle<()>,
    connections: Arc<ConnectionLimit>,
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
    // Published when the context takes effect: a reload that fails must not show its
    // certificate as the one in use.
    let mut certificate_expiry = None;
    let tls = match &settings.tls {
        None => None,
        Some(tls) => {
            let alpn = tls.alpn_for(settings.protocol);
            let files = crate::tls::ServerFiles {
                alpn: Some(&alpn),
                ..tls.files()
            };
            let config = crate::tls::server_config(&files).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("listener `{}`: TLS: {e}", settings.name),
                )
            })?;
            let leaf = crate::tls::certificates(&tls.cert_file)
                .ok()
                .and_then(|c| c.into_iter().next());
            certificate_expiry = leaf.as_ref().and_then(|l| crate::tls::not_after(l));
            let by = leaf.and_then(|leaf| crate::tls::sans(&leaf).uris.into_iter().next());
            Some((tokio_rustls::TlsAcceptor::from(config), by))
        }
    };
    Ok(Arc::new(ListenerContext {
        settings,
        store,
        access_log,
        tls,
        certificate_expiry,
    }))
}

impl Prepared {
    /// Starts accepting.
    pub fn start(self) -> Listener {
        let settings = &self.ctx.settings;
        tracing::info!(listener = %settings.name, address = %self.local_addr, "listening");
        self.ctx.publish();
        let connections = Arc::new(ConnectionLimit::new(settings.max_connections));
        let ctx = Arc::new(ArcSwap::new(self.ctx));
        let (stop_accepting, stop_rx) = watch::channel(false);
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let accept_task = tokio::spawn(accept_loop(
            self.socket,
            ctx.clone(),
            connections.clone(),
            stop_rx,
            phase_rx,
        ));
        Listener {
            local_addr: self.local_addr,
            ctx,
            stop_accepting,
            phase,
            accept_task,
            connections,
        }
    }
}

impl Listener {
    pub fn settings(&self) -> ListenerSettings {
        self.ctx.load().settings.clone()
    }

    /// Builds the context new settings for the same address need (access log, TLS): the
    /// step that can fail, taken before a reload changes anything.
    pub fn prepare_update(
        &self,
        settings: ListenerSettings,
        store: Arc<SnapshotStore>,
    ) -> io::Result<Arc<ListenerContext>> {
        context(settings, store, Some(&self.ctx.load()))
    }

    /// Applies a prepared context: connections accepted from now on use its settings,
    /// requests on open connections route by them, and a lower `max_connections` holds new
    /// connections back until enough open ones have closed.
    pub fn update(&self, ctx: Arc<ListenerContext>) {
        ctx.publish();
        self.connections.set_max(ctx.settings.max_connections);
        self.ctx.store(ctx);
    }

    /// Stops accepting (new connections are refused), asks every open connection to finish
    /// (HTTP/1.1 `Connection: close` after the response in progress, HTTP/2 GOAWAY), and
    /// waits up to `timeout` for them to close, upgraded tunnels included; then closes
    /// whatever is left. Returns how many were still open at the timeout.
    pub async fn drain(self, timeout: Duration) -> usize {
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_task.await;
        let _ = self.phase.send(Phase::Draining);
        if tokio::time::timeout(timeout, self.connections.all_closed())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.connections.active();
        let _ = self.phase.send(Phase::Closing);
        // Give the closing connections a moment to go, so that the count they free is real.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.connections.all_closed()).await;
        left
    }
}

async fn accept_loop(
    socket: TcpListener,
    ctx: Arc<ArcSwap<ListenerContext>>,
    connections: Arc<ConnectionLimit>,
    mut stop: watch::Receiver<bool>,
    phase: watch::Receiver<Phase>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = socket.accept() => accepted,
        };
        let current = ctx.load_full();
        let metrics = &current.settings.metrics;
        match accepted {
            Ok((stream, peer)) => {
                let Some(permit) = connections.try_acquire() else {
                    metrics.connections_overflow.inc();
                    tracing::debug!(listener = %current.settings.name, %peer, "max_connections reached; closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                metrics.connections_total.inc();
                tokio::spawn(connection::serve(
                    ctx.clone(),
                    current,
                    stream,
                    peer,
                    permit,
                    phase.clone(),
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %current.settings.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
