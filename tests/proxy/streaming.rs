//! Bodies stream both ways; WebSocket upgrades work end to end.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn large_bodies_stream_through_in_both_directions() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("http://{}/echo", p.addr))
        .header("host", "svc")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed body differs");
}

#[tokio::test]
async fn a_streaming_response_arrives_chunk_by_chunk() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let req = Request::get(format!("http://{}/stream", p.addr))
        .header("host", "svc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first, "chunk0\n");
    let rest = body.collect().await.unwrap().to_bytes();
    let all_at = started.elapsed();
    assert_eq!(rest, "chunk1\nchunk2\nchunk3\nchunk4\n");
    // The first chunk was forwarded before the upstream finished (4 gaps of 50 ms).
    assert!(
        all_at - first_at >= Duration::from_millis(150),
        "{first_at:?} {all_at:?}"
    );
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    // A real WebSocket echo server.
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let p = proxy(&config(
        &one_route("cluster: ws"),
        &cluster("ws", &[(port, 1)], ""),
    ))
    .await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/chat", p.addr), stream)
        .await
        .expect("handshake through remora");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[0u8, 1, 2, 255]
    );
    ws.close(None).await.unwrap();
}
