//! HTTP/1.1 on the wire, for the tests that must see exactly what remora writes: raw
//! exchanges on a TcpStream and a small response parser (framing by Content-Length or
//! chunked, bodiless responses).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One HTTP/1.1 response as read off the wire.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    /// The header lines, names lowercased, values trimmed.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

/// The response at the start of `buf` and the bytes it takes, once it is whole (`None`
/// while incomplete or when it is not HTTP/1.1). `bodiless`: the answer to a HEAD; 1xx,
/// 204 and 304 are bodiless anyway. A response framed by neither a length nor chunking
/// takes the rest of `buf` (whole only once the peer has closed).
pub(crate) fn parse_reply(buf: &[u8], bodiless: bool) -> Option<(Reply, usize)> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end - 4]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect();
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if bodiless || status < 200 || status == 204 || status == 304 {
        return Some((reply, head_end));
    }
    let rest = &buf[head_end..];
    let chunked = reply
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut at = 0;
        loop {
            let line_end = at + find(&rest[at..], b"\r\n")?;
            let line = std::str::from_utf8(&rest[at..line_end]).ok()?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // The trailer section, up to its empty line.
                loop {
                    let end = at + find(&rest[at..], b"\r\n")?;
                    let blank = end == at;
                    at = end + 2;
                    if blank {
                        return Some((reply, head_end + at));
                    }
                }
            }
            let data_end = at.checked_add(size)?;
            let chunk_end = data_end.checked_add(2)?;
            if rest.len() < chunk_end || &rest[data_end..chunk_end] != b"\r\n" {
                return None;
            }
            reply.body.extend_from_slice(&rest[at..data_end]);
            at = chunk_end;
        }
    }
    let content_length = reply.header("content-length").map(|v| v.parse::<usize>());
    match content_length {
        Some(Ok(len)) => {
            if rest.len() < len {
                return None;
            }
            reply.body = rest[..len].to_vec();
            Some((reply, head_end + len))
        }
        Some(Err(_)) => None,
        None => {
            reply.body = rest.to_vec();
            Some((reply, buf.len()))
        }
    }
}

/// Every whole response in `buf`, in order, and the bytes left after them. `heads[i]`: the
/// `i`th response answers a HEAD.
pub(crate) fn parse_replies<'a>(buf: &'a [u8], heads: &[bool]) -> (Vec<Reply>, &'a [u8]) {
    let mut replies = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let head = heads.get(replies.len()).copied().unwrap_or(false);
        let Some((reply, used)) = parse_reply(&buf[at..], head) else {
            break;
        };
        replies.push(reply);
        at += used;
    }
    (replies, &buf[at..])
}

/// Reads from `s` until `enough` holds for all that was read, the peer closes (EOF or an
/// error such as a reset), or `limit` passes; returns what was read and whether it closed.
pub(crate) async fn read_until(
    s: &mut TcpStream,
    limit: Duration,
    enough: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut closed = false;
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    closed = true;
                    return;
                }
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if enough(got.as_slice()) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    (got, closed)
}

/// Writes `request` (all at once) on a new connection and reads until the peer closes or
/// `limit` passes; returns what was read and whether the peer closed.
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect to remora");
    // The peer may close before taking every byte: what it answered is still read.
    let _ = s.write_all(request).await;
    read_until(&mut s, limit, |_| false).await
}

/// A response head promising 100,000 bytes, and the first 3 of them.
pub(crate) const STALLED_BODY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nabc";

/// An upstream that reads a request, writes `answer`, then holds the connection open and
/// silent until remora lets it go (at most 30 s).
pub(crate) struct StallingUpstream {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
}

impl StallingUpstream {
    pub(crate) async fn start(answer: impl Into<Vec<u8>>) -> StallingUpstream {
        let answer: Arc<[u8]> = answer.into().into();
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = socket.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(&answer).await;
                    let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
                });
            }
        });
        StallingUpstream { port, accepted }
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
