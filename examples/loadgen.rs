//! Fixed-rate HTTP/1.1 load for the benchmark (`bench/run`): each connection sends on a
//! schedule, and latency counts from the scheduled send time, so a stall is not hidden by
//! the client waiting for it (no coordinated omission). Prints one JSON line.
//!
//! `loadgen ADDR RATE SECONDS CONNECTIONS [HOST]`, e.g. `loadgen 127.0.0.1:18001 2000 10 20`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: loadgen ADDR RATE SECONDS CONNECTIONS [HOST]");
        std::process::exit(2);
    }
    let addr = args[1].clone();
    let rate: f64 = args[2].parse().expect("rate");
    let seconds: f64 = args[3].parse().expect("seconds");
    let connections: usize = args[4].parse().expect("connections");
    let host = args.get(5).cloned().unwrap_or_else(|| "bench".into());
    let per_conn_gap = Duration::from_secs_f64(connections as f64 / rate);
    let total_per_conn = (rate * seconds / connections as f64) as usize;
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (addr, host) = (addr.clone(), host.clone());
        // Stagger connections evenly across one gap.
        let offset = per_conn_gap.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&addr).await.expect("connect");
            stream.set_nodelay(true).ok();
            let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut latencies = Vec::with_capacity(total_per_conn);
            let mut errors = 0usize;
            let mut previous_done = Instant::now();
            for i in 0..total_per_conn {
                let due = start + offset + per_conn_gap.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                // Late because the previous answer was: count from the due time (the wait is
                // real queueing). Late only because the timer wheel ticks in milliseconds:
                // count from now, so timer slop does not pose as proxy latency.
                let from = if previous_done > due {
                    due
                } else {
                    Instant::now()
                };
                let req = http::Request::get("/")
                    .header("host", host.as_str())
                    .body(Empty::new())
                    .unwrap();
                if sender.ready().await.is_err() {
                    errors += total_per_conn - i;
                    break;
                }
                match sender.send_request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        latencies.push(from.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
                previous_done = Instant::now();
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)]
        }
    };
    let mean = all.iter().sum::<u64>() as f64 / all.len().max(1) as f64;
    println!(
        "{{\"ok\": {}, \"errors\": {}, \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"mean_us\": {:.1}}}",
        all.len(),
        errors,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        mean
    );
}
