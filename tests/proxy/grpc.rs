//! gRPC through remora over h2c: unary, server errors in trailers, bidirectional streaming.
//! The service is hand-wired with tonic's server primitives, so no protoc is needed.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use http::uri::PathAndQuery;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::support::*;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
}

#[derive(Clone)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Unary;
impl UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;
    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let text = req.into_inner().text;
            if text == "fail" {
                let mut status = Status::new(Code::NotFound, "no such thing");
                status
                    .metadata_mut()
                    .insert("x-detail", "from-upstream".parse().unwrap());
                return Err(status);
            }
            let mut resp = Response::new(Msg {
                text: format!("echo: {text}"),
            });
            resp.metadata_mut()
                .insert("x-served-by", "echo".parse().unwrap());
            Ok(resp)
        })
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

struct Bidi;
impl StreamingService<Msg> for Bidi {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let incoming = req.into_inner();
            let out = incoming.map(|m| {
                m.map(|m| Msg {
                    text: m.text.to_uppercase(),
                })
            });
            Ok(Response::new(Box::pin(out) as MsgStream))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<Msg, Msg>::default());
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Unary, req).await,
                "/test.Echo/Bidi" => grpc.streaming(Bidi, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// The `test.Echo` service served over h2c on 127.0.0.1:0; returns its port.
pub(crate) async fn echo_upstream() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Echo)
            .serve_with_incoming(TcpListenerStream::new(socket)),
    );
    port
}

async fn grpc_setup() -> (Proxy, tonic::client::Grpc<tonic::transport::Channel>) {
    let port = echo_upstream().await;
    let routes = "      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: /test.Echo/ }, cluster: grpc }] }";
    let p = proxy(&config(
        routes,
        &cluster("grpc", &[(port, 1)], "    protocol: http2\n"),
    ))
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", p.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (p, tonic::client::Grpc::new(channel))
}

#[tokio::test]
async fn grpc_unary_passes_through_with_metadata_and_error_trailers() {
    let (_p, mut grpc) = grpc_setup().await;
    grpc.ready().await.unwrap();
    let resp = grpc
        .unary(
            Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/test.Echo/Unary"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .expect("unary call");
    assert_eq!(resp.metadata().get("x-served-by").unwrap(), "echo");
    assert_eq!(resp.into_inner().text, "echo: hi");

    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            Request::new(Msg {
                text: "fail".into(),
            }),
            PathAndQuery::from_static("/test.Echo/Unary"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .expect_err("the upstream's error status");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such thing");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "from-upstream");
}

#[tokio::test]
async fn grpc_bidirectional_streaming_interleaves_both_ways() {
    let (_p, mut grpc) = grpc_setup().await;
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let resp = grpc.streaming(
        Request::new(outbound),
        PathAndQuery::from_static("/test.Echo/Bidi"),
        ProstCodec::<Msg, Msg>::default(),
    );
    // Send the first message before awaiting the response headers: a true stream.
    tx.send(Msg { text: "one".into() }).await.unwrap();
    let mut inbound = resp.await.expect("stream opened").into_inner();
    assert_eq!(inbound.message().await.unwrap().unwrap().text, "ONE");
    // Each reply arrives before the next request is sent.
    for word in ["two", "three", "four"] {
        tx.send(Msg { text: word.into() }).await.unwrap();
        assert_eq!(
            inbound.message().await.unwrap().unwrap().text,
            word.to_uppercase()
        );
    }
    drop(tx);
    assert!(
        inbound.message().await.unwrap().is_none(),
        "clean end with OK trailers"
    );
    let trailers = inbound.trailers().await.unwrap();
    assert!(trailers.is_some());
}

/// remora's own replies to gRPC calls are gRPC-shaped (HTTP 200, `grpc-status`,
/// `grpc-message`), as Envoy's: an unreachable upstream is UNAVAILABLE, no route is
/// UNIMPLEMENTED.
#[tokio::test]
async fn local_replies_to_grpc_calls_are_grpc_statuses() {
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let routes = "      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: /test.Echo/ }, cluster: grpc }] }";
    let p = proxy(&config(
        routes,
        &cluster("grpc", &[(closed, 1)], "    protocol: http2\n"),
    ))
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", p.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/test.Echo/Unary"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .expect_err("no upstream");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "upstream_connect_failure: the upstream connection failed",
        "the failure, not the endpoint's address: {status:?}"
    );

    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/other.Service/Call"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .expect_err("no route");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
}
