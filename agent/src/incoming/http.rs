//! Stealing only matching HTTP/1.x requests.
//!
//! On a stolen connection the agent reads one request at a time, decides by the filter
//! (a regex on header lines and/or the path) whether it goes to the local app (over the
//! tunnel) or to the pod's own app (over the pod's loopback), forwards it, and relays exactly
//! one response back before reading the next request — so one keep-alive client connection
//! can alternate between both. Both backend connections are opened lazily and reused.
//!
//! Not filtered, passed through to the pod's app untouched: HTTP/2 (prior knowledge preface),
//! `CONNECT` and `Upgrade` requests (WebSocket), and anything that does not parse as HTTP/1.x.
//!
//! Pod clients are not trusted: a head longer than [`super::http_wire::MAX_HEAD`] closes the
//! connection as soon as that many bytes arrived (nothing more is buffered), and a client that
//! does not complete its next request head within [`REQUEST_WAIT`] is closed too.

use super::http_wire::{
    BodyFraming, RequestHead, copy_body, parse_request_head, read_head, response_framing,
};
use crate::netns::NetnsWorker;
use kmirror_protocol::tunnel::Tunnel;
use kmirror_protocol::{HttpFilter, IncomingMode, OpenTarget};
use regex::bytes::Regex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// How long a filtered connection may take to deliver its next complete request head (the
/// keep-alive idle time between requests included).
pub const REQUEST_WAIT: Duration = Duration::from_secs(60);
/// Bytes buffered each way between a filtered connection and its stream to the local app.
const LOCAL_PIPE: usize = 64 * 1024;

pub struct Filter {
    header: Option<Regex>,
    path: Option<Regex>,
}

impl Filter {
    pub fn new(spec: &HttpFilter) -> Result<Filter, regex::Error> {
        Ok(Filter {
            header: spec.header.as_deref().map(Regex::new).transpose()?,
            path: spec.path.as_deref().map(Regex::new).transpose()?,
        })
    }

    /// A request matches when every configured pattern matches (a header pattern matches if
    /// any `Name: value` line does).
    pub fn matches(&self, head: &RequestHead) -> bool {
        let header_ok =
            self.header.as_ref().is_none_or(|re| head.header_lines.iter().any(|l| re.is_match(l)));
        let path_ok = self.path.as_ref().is_none_or(|re| re.is_match(&head.target));
        header_ok && path_ok
    }
}

type Backend = BufReader<Box<dyn AsyncReadWrite>>;

pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

/// Serves one stolen connection request by request.
pub async fn serve_filtered(
    conn: TcpStream,
    client: SocketAddr,
    original: SocketAddr,
    filter: Arc<Filter>,
    tunnel: Tunnel,
    netns: NetnsWorker,
) {
    let mut client_io = BufReader::new(conn);
    let mut local: Option<Backend> = None;
    let mut pod: Option<Backend> = None;
    loop {
        let next = tokio::time::timeout(REQUEST_WAIT, next_request(&mut client_io)).await;
        let head = match next {
            Ok(Next::Head(head)) => head,
            Ok(Next::Http2) => {
                tracing::info!(%client, "HTTP/2 is not filtered: passing the connection to the pod's app");
                return passthrough(client_io, original, &netns).await;
            }
            Ok(Next::End) => return,
            Ok(Next::Refused(e)) => {
                tracing::info!(%client, "closing a filtered connection: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%client, "no complete request within {REQUEST_WAIT:?}; closing the connection");
                return;
            }
        };
        let request = match parse_request_head(head) {
            Ok(r) => r,
            Err(_) => return,
        };
        if request.upgrade {
            tracing::info!(%client, "upgrade/CONNECT is not filtered: passing the connection to the pod's app");
            return passthrough_with(client_io, request.raw, original, &netns).await;
        }
        let to_local = filter.matches(&request);
        let backend = if to_local { &mut local } else { &mut pod };
        if backend.is_none() {
            *backend = if to_local {
                open_local(&tunnel, original, client).await
            } else {
                open_pod(&netns, original).await
            };
        }
        let Some(b) = backend.as_mut() else {
            tracing::warn!(%client, to_local, "no backend for a filtered request; closing the client connection");
            return;
        };
        if forward_exchange(&mut client_io, b, &request).await.is_err() {
            return;
        }
    }
}

enum Next {
    Head(Vec<u8>),
    Http2,
    End,
    Refused(std::io::Error),
}

/// The next request head, or what else the client does.
async fn next_request(client_io: &mut BufReader<TcpStream>) -> Next {
    // Peek for the HTTP/2 preface before parsing anything.
    match client_io.fill_buf().await {
        Ok([]) | Err(_) => return Next::End,
        Ok(buf) if buf.starts_with(&H2_PREFACE[..buf.len().min(H2_PREFACE.len())]) => return Next::Http2,
        Ok(_) => {}
    }
    match read_head(client_io).await {
        Ok(Some(head)) => Next::Head(head),
        Ok(None) => Next::End,
        Err(e) => Next::Refused(e),
    }
}

async fn open_local(tunnel: &Tunnel, original: SocketAddr, client: SocketAddr) -> Option<Backend> {
    let server = SocketAddr::new(original.ip().to_canonical(), original.port());
    let target = OpenTarget::Incoming { server, client, mode: IncomingMode::Steal };
    let stream = tunnel.open(target, Duration::from_secs(10)).await.ok()?;
    let (ours, theirs) = tokio::io::duplex(LOCAL_PIPE);
    tokio::spawn(stream.relay_io(theirs));
    Some(BufReader::new(Box::new(ours)))
}

async fn open_pod(netns: &NetnsWorker, original: SocketAddr) -> Option<Backend> {
    let domain = if original.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = netns.socket(domain, libc::SOCK_STREAM).await.ok()?;
    let conn =
        tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd)).connect(original).await.ok()?;
    let _ = conn.set_nodelay(true);
    Some(BufReader::new(Box::new(conn)))
}

/// Forwards one request to `backend` and its response(s) back to the client.
async fn forward_exchange(
    client: &mut BufReader<TcpStream>,
    backend: &mut Backend,
    request: &RequestHead,
) -> std::io::Result<()> {
    backend.get_mut().write_all(&request.raw).await?;
    copy_body(client, backend.get_mut(), request.body).await?;
    backend.get_mut().flush().await?;
    loop {
        let head = read_head(backend).await?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let (status, framing) = response_framing(&head, &request.method)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad response"))?;
        client.get_mut().write_all(&head).await?;
        copy_body(backend, client.get_mut(), framing).await?;
        client.get_mut().flush().await?;
        if framing == BodyFraming::UntilClose {
            // The response ended with the backend's connection: so does the client's.
            let _ = client.get_mut().shutdown().await;
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !(100..200).contains(&status) {
            return Ok(());
        }
    }
}

async fn passthrough(client: BufReader<TcpStream>, original: SocketAddr, netns: &NetnsWorker) {
    passthrough_with(client, Vec::new(), original, netns).await
}

async fn passthrough_with(
    client: BufReader<TcpStream>,
    prefix: Vec<u8>,
    original: SocketAddr,
    netns: &NetnsWorker,
) {
    let Some(mut pod) = open_pod(netns, original).await else { return };
    let buffered = client.buffer().to_vec();
    let mut conn = client.into_inner();
    if pod.get_mut().write_all(&prefix).await.is_err() || pod.get_mut().write_all(&buffered).await.is_err() {
        return;
    }
    let mut pod = pod.into_inner();
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut pod).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incoming::http_wire::ParseError;
    use tokio::io::AsyncReadExt;

    #[test]
    fn parses_requests_and_matches_filters() {
        let head =
            b"POST /api/users?x=1 HTTP/1.1\r\nHost: a\r\nX-Dev: alice\r\nContent-Length: 5\r\n\r\n".to_vec();
        let req = parse_request_head(head).unwrap();
        assert_eq!(req.method, b"POST");
        assert_eq!(req.target, b"/api/users?x=1");
        assert_eq!(req.body, BodyFraming::Length(5));
        let by_header =
            Filter::new(&HttpFilter { header: Some("^X-Dev: alice$".into()), path: None }).unwrap();
        assert!(by_header.matches(&req));
        let by_path = Filter::new(&HttpFilter { header: None, path: Some("^/admin".into()) }).unwrap();
        assert!(!by_path.matches(&req));
        let both =
            Filter::new(&HttpFilter { header: Some("X-Dev: alice".into()), path: Some("^/api/".into()) })
                .unwrap();
        assert!(both.matches(&req));
        let chunked =
            parse_request_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec())
                .unwrap();
        assert_eq!(chunked.body, BodyFraming::Chunked);
        let ws = parse_request_head(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n".to_vec()).unwrap();
        assert!(ws.upgrade);
        assert_eq!(parse_request_head(b"hello world\r\n\r\n".to_vec()).unwrap_err(), ParseError::NotHttp);
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec()).unwrap_err(),
            ParseError::NotHttp
        );
    }

    #[test]
    fn response_framing_rules() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(response_framing(ok, b"GET"), Ok((200, BodyFraming::Length(3))));
        assert_eq!(response_framing(ok, b"HEAD"), Ok((200, BodyFraming::None)));
        assert_eq!(
            response_framing(b"HTTP/1.1 204 No Content\r\n\r\n", b"GET"),
            Ok((204, BodyFraming::None))
        );
        assert_eq!(response_framing(b"HTTP/1.1 100 Continue\r\n\r\n", b"POST"), Ok((100, BodyFraming::None)));
        assert_eq!(response_framing(b"HTTP/1.0 200 OK\r\n\r\n", b"GET"), Ok((200, BodyFraming::UntilClose)));
        assert_eq!(
            response_framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET"),
            Ok((200, BodyFraming::Chunked))
        );
    }

    #[tokio::test]
    async fn chunked_bodies_are_copied_exactly_and_stop_at_their_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT".to_vec();
        let mut reader = BufReader::new(&body[..]);
        let mut out = Vec::new();
        copy_body(&mut reader, &mut out, BodyFraming::Chunked).await.unwrap();
        assert_eq!(out, &body[..body.len() - 4]);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"NEXT");
    }
}
