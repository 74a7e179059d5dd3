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

use crate::netns::NetnsWorker;
use kmirror_protocol::tunnel::Tunnel;
use kmirror_protocol::{HttpFilter, IncomingMode, OpenTarget};
use regex::bytes::Regex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 64 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

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

/// What decides routing and framing of one request.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub raw: Vec<u8>,
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    pub header_lines: Vec<Vec<u8>>,
    pub body: BodyFraming,
    pub upgrade: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    #[default]
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    NotHttp,
}

fn header_value<'a>(lines: &'a [Vec<u8>], name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
    let name = name.as_bytes().to_vec();
    lines.iter().filter_map(move |l| {
        let colon = l.iter().position(|&b| b == b':')?;
        l[..colon].eq_ignore_ascii_case(&name).then(|| l[colon + 1..].trim_ascii())
    })
}

fn framing(lines: &[Vec<u8>]) -> Result<Option<BodyFraming>, ParseError> {
    if header_value(lines, "transfer-encoding")
        .any(|v| v.to_ascii_lowercase().windows(7).any(|w| w == b"chunked"))
    {
        return Ok(Some(BodyFraming::Chunked));
    }
    match header_value(lines, "content-length").next() {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(|n| Some(BodyFraming::Length(n)))
            .ok_or(ParseError::NotHttp),
        None => Ok(None),
    }
}

/// Splits a head into its first line and header lines (CRLF or LF endings).
fn lines(head: &[u8]) -> Vec<Vec<u8>> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
        .filter(|l| !l.is_empty())
        .collect()
}

pub fn parse_request_head(raw: Vec<u8>) -> Result<RequestHead, ParseError> {
    let all = lines(&raw);
    let (first, headers) = all.split_first().ok_or(ParseError::NotHttp)?;
    let mut parts = first.split(|&b| b == b' ');
    let method = parts.next().ok_or(ParseError::NotHttp)?.to_vec();
    let target = parts.next().ok_or(ParseError::NotHttp)?.to_vec();
    let version = parts.next().ok_or(ParseError::NotHttp)?;
    if !version.starts_with(b"HTTP/1.") || method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) {
        return Err(ParseError::NotHttp);
    }
    let header_lines = headers.to_vec();
    let body = framing(&header_lines)?.unwrap_or(BodyFraming::None);
    let upgrade = method == b"CONNECT" || header_value(&header_lines, "upgrade").next().is_some();
    Ok(RequestHead { raw, method, target, header_lines, body, upgrade })
}

/// Response framing per RFC 9112 §6.3, given the request method and status.
pub fn response_framing(head: &[u8], request_method: &[u8]) -> Result<(u16, BodyFraming), ParseError> {
    let all = lines(head);
    let (first, headers) = all.split_first().ok_or(ParseError::NotHttp)?;
    let mut parts = first.splitn(3, |&b| b == b' ');
    let version = parts.next().ok_or(ParseError::NotHttp)?;
    if !version.starts_with(b"HTTP/1.") {
        return Err(ParseError::NotHttp);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .ok_or(ParseError::NotHttp)?;
    if request_method == b"HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok((status, BodyFraming::None));
    }
    Ok((status, framing(headers)?.unwrap_or(BodyFraming::UntilClose)))
}

/// Reads a message head (through the blank line).
async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = reader.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") || head == b"\r\n" || head == b"\n" {
            if head.len() <= 2 {
                head.clear(); // tolerate stray CRLF between requests (RFC 9112 §2.2)
                continue;
            }
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message head too large"));
        }
    }
}

/// Copies a body of the given framing from `from` to `to`.
async fn copy_body<R, W>(from: &mut R, to: &mut W, framing: BodyFraming) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(n) => {
            let copied = tokio::io::copy(&mut (&mut *from).take(n), to).await?;
            if copied < n { Err(std::io::ErrorKind::UnexpectedEof.into()) } else { Ok(()) }
        }
        BodyFraming::UntilClose => tokio::io::copy(from, to).await.map(drop),
        BodyFraming::Chunked => loop {
            let mut line = Vec::new();
            if from.read_until(b'\n', &mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            to.write_all(&line).await?;
            let size_text = line.split(|&b| b == b';' || b == b'\r' || b == b'\n').next().unwrap_or(b"");
            let size = std::str::from_utf8(size_text.trim_ascii())
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailer section, ended by an empty line.
                loop {
                    let mut trailer = Vec::new();
                    if from.read_until(b'\n', &mut trailer).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    to.write_all(&trailer).await?;
                    if trailer == b"\r\n" || trailer == b"\n" {
                        return Ok(());
                    }
                }
            }
            let copied = tokio::io::copy(&mut (&mut *from).take(size), to).await?;
            if copied < size {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let mut crlf = Vec::new();
            from.read_until(b'\n', &mut crlf).await?;
            to.write_all(&crlf).await?;
        },
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
        // Peek for the HTTP/2 preface before parsing anything.
        let head = match client_io.fill_buf().await {
            Ok([]) | Err(_) => return,
            Ok(buf) if buf.starts_with(&H2_PREFACE[..buf.len().min(H2_PREFACE.len())]) => {
                tracing::info!(%client, "HTTP/2 is not filtered: passing the connection to the pod's app");
                return passthrough(client_io, original, &netns).await;
            }
            Ok(_) => match read_head(&mut client_io).await {
                Ok(Some(head)) => head,
                _ => return,
            },
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

async fn open_local(tunnel: &Tunnel, original: SocketAddr, client: SocketAddr) -> Option<Backend> {
    let server = SocketAddr::new(original.ip().to_canonical(), original.port());
    let target = OpenTarget::Incoming { server, client, mode: IncomingMode::Steal };
    let stream = tunnel.open(target, Duration::from_secs(10)).await.ok()?;
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
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
