//! HTTP/1.x message framing for the steal filter: parsing request and response heads, and
//! reading heads and bodies from a peer with every buffer bounded.
//!
//! Pure and self-contained (std and tokio's I/O traits only), so the fuzz target
//! `protocol/fuzz/fuzz_targets/http_filter.rs` includes this file as is.
//!
//! Bounds: a message head (request or status line, header lines, the blank line) is at most
//! [`MAX_HEAD`] bytes, checked before anything beyond it is buffered; a chunk-size line at most
//! [`MAX_CHUNK_LINE`]; a chunked body's trailer section counts against [`MAX_HEAD`]. Bodies are
//! streamed, never held.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest message head accepted, from either side.
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (size and extensions) of a chunked body.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;

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

fn too_long(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what} too long"))
}

/// Appends one line (through `\n`, or what is left at the end of the stream) to `out`, failing
/// as soon as the line would exceed `limit` bytes: never buffers more than `limit` of it.
/// Returns the line's length (0 at the end of the stream).
pub async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<usize> {
    let mut taken = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(taken);
        }
        let (len, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        if taken + len > limit {
            return Err(too_long("line"));
        }
        out.extend_from_slice(&buf[..len]);
        reader.consume(len);
        taken += len;
        if done {
            return Ok(taken);
        }
    }
}

/// Reads a message head (through the blank line), at most [`MAX_HEAD`] bytes.
pub async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let room = MAX_HEAD - head.len();
        let n = read_line_limited(reader, &mut head, room).await.map_err(|_| too_long("message head"))?;
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
        if head.len() >= MAX_HEAD {
            return Err(too_long("message head"));
        }
    }
}

/// Copies a body of the given framing from `from` to `to`.
pub async fn copy_body<R, W>(from: &mut R, to: &mut W, framing: BodyFraming) -> std::io::Result<()>
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
            if read_line_limited(from, &mut line, MAX_CHUNK_LINE).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            to.write_all(&line).await?;
            let size_text = line.split(|&b| b == b';' || b == b'\r' || b == b'\n').next().unwrap_or(b"");
            let size = std::str::from_utf8(size_text.trim_ascii())
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailer section, ended by an empty line; as large as a head at most.
                let mut trailers = 0;
                loop {
                    let mut trailer = Vec::new();
                    let n = read_line_limited(from, &mut trailer, MAX_HEAD - trailers).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    trailers += n;
                    to.write_all(&trailer).await?;
                    if trailer == b"\r\n" || trailer == b"\n" {
                        return Ok(());
                    }
                    if trailers >= MAX_HEAD {
                        return Err(too_long("trailer section"));
                    }
                }
            }
            let copied = tokio::io::copy(&mut (&mut *from).take(size), to).await?;
            if copied < size {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let mut crlf = Vec::new();
            read_line_limited(from, &mut crlf, MAX_CHUNK_LINE).await?;
            to.write_all(&crlf).await?;
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, BufReader, ReadBuf};

    /// An endless stream of one byte, counting what was read from it.
    struct Endless {
        byte: u8,
        served: usize,
    }

    impl AsyncRead for Endless {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = buf.remaining();
            buf.put_slice(&vec![self.byte; n]);
            self.served += n;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_endless_header_line_is_refused_after_the_head_limit() {
        let mut reader = BufReader::new(Endless { byte: b'a', served: 0 });
        let err = read_head(&mut reader).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        // Nothing past the limit (plus one read-ahead buffer) was even read.
        assert!(reader.get_ref().served <= MAX_HEAD + 8 * 1024, "read {} bytes", reader.get_ref().served);
    }

    #[tokio::test]
    async fn heads_up_to_the_limit_are_read_and_longer_ones_refused() {
        let fit = |len: usize| {
            let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
            head.resize(len - 4, b'v');
            head.extend_from_slice(b"\r\n\r\n");
            head
        };
        let exact = fit(MAX_HEAD);
        assert_eq!(read_head(&mut &exact[..]).await.unwrap().unwrap(), exact);
        let over = fit(MAX_HEAD + 1);
        assert!(read_head(&mut &over[..]).await.is_err());
        // Many short lines count together.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        while many.len() <= MAX_HEAD {
            many.extend_from_slice(b"X-A: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert!(read_head(&mut &many[..]).await.is_err());
    }

    #[tokio::test]
    async fn endless_chunk_size_lines_and_trailers_are_refused() {
        let mut reader = BufReader::new(Endless { byte: b'1', served: 0 });
        let mut sink = Vec::new();
        assert!(copy_body(&mut reader, &mut sink, BodyFraming::Chunked).await.is_err());
        assert!(sink.is_empty());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() <= MAX_HEAD + 10 {
            trailers.extend_from_slice(b"T: x\r\n");
        }
        let mut sink = Vec::new();
        assert!(copy_body(&mut &trailers[..], &mut sink, BodyFraming::Chunked).await.is_err());
        assert!(sink.len() <= MAX_HEAD + MAX_CHUNK_LINE);
    }
}
