//! `remora demo`: remora on the embedded demo config, in front of two in-process upstreams
//! on loopback (orders-v1 fast; orders-v2 slow and failing one request in five).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::{App, ConfigSource};
use crate::body;

/// The demo config, with `{{V1_PORT}}` and `{{V2_PORT}}` to fill in.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

/// Starts the demo upstreams and remora; prints what to try; serves until a signal.
pub async fn run() -> anyhow::Result<()> {
    let v1 = spawn_upstream("orders-v1", Duration::ZERO, 0).await?;
    let v2 = spawn_upstream("orders-v2", Duration::from_millis(150), 5).await?;
    let text = DEMO_CONFIG
        .replace("{{V1_PORT}}", &v1.port().to_string())
        .replace("{{V2_PORT}}", &v2.port().to_string());
    let raw = crate::config::parse(&text, "<demo>")?;
    let app = App::start(raw, ConfigSource::Inline("demo".into()), &text).await?;
    let proxy = app.listener_address("demo").expect("demo listener");
    let admin = app.admin_address;
    println!(
        "\nremora demo is running.\n\
         \n  upstreams: orders-v1 on {v1} (fast), orders-v2 on {v2} (150 ms, fails 1 in 5)\
         \n  listener:  http://{proxy}   (90% to orders-v1, 10% to orders-v2; 5xx retried)\
         \n  admin:     http://{admin}\n\
         \nTry:\
         \n  curl -i http://{proxy}/orders\
         \n  for i in $(seq 20); do curl -s http://{proxy}/orders; done | sort | uniq -c\
         \n  curl -i -H 'x-canary: 1' http://{proxy}/orders      # always orders-v2, no retries\
         \n  curl -i http://{proxy}/healthz                      # direct response\
         \n  curl -s http://{admin}/metrics | grep -E 'remora_(upstream_requests|upstream_retries)'\
         \n  curl -s http://{admin}/clusters\
         \n\nAccess log lines follow. Ctrl-C stops.\n"
    );
    app.run_until_signal().await?;
    Ok(())
}

/// A tiny HTTP/1.1 server that names itself; `fail_one_in` > 0 makes every Nth request 503.
async fn spawn_upstream(
    name: &'static str,
    delay: Duration,
    fail_one_in: u64,
) -> std::io::Result<SocketAddr> {
    let socket = TcpListener::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let counter = counter.clone();
            let service = service_fn(move |_req| {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                async move {
                    tokio::time::sleep(delay).await;
                    let failing = fail_one_in > 0 && n % fail_one_in == 0;
                    let mut resp = Response::new(body::full(if failing {
                        format!("{name} failed\n")
                    } else {
                        format!("hello from {name}\n")
                    }));
                    if failing {
                        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    Ok(addr)
}
