//! The agent's HTTP steal filter reading what a pod client sends: request heads, their
//! parse, and bodies (fixed length, chunked with trailers), request after request on one
//! connection, however the bytes are split across reads. No panic; a head is never longer
//! than the limit; a body copy never yields more than came in; a parsed head keeps its raw
//! bytes. The first input byte picks the read size and the read-ahead buffer's size.
//!
//! The parser lives in the agent binary; its framing module has no dependency besides std
//! and tokio's I/O traits, so it is compiled in here from its source file as is.
#![no_main]
#[path = "../../../agent/src/incoming/http_wire.rs"]
#[allow(dead_code)]
mod http_wire;

use http_wire::{BodyFraming, MAX_HEAD, copy_body, parse_request_head, read_head, response_framing};
use libfuzzer_sys::fuzz_target;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, BufReader, ReadBuf};

/// Hands out at most `chunk` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let trickle = Trickle { data, chunk: usize::from(split & 0x0f) * 61 + 1 };
        let mut client = BufReader::with_capacity(usize::from(split >> 4) * 512 + 16, trickle);
        let mut body_bytes = 0;
        loop {
            let head = match read_head(&mut client).await {
                Ok(Some(head)) => head,
                Ok(None) | Err(_) => break,
            };
            assert!(head.len() <= MAX_HEAD, "a head of {} bytes was accepted", head.len());
            let request = match parse_request_head(head.clone()) {
                Ok(request) => request,
                Err(_) => {
                    // The same bytes as a response head (the filter parses backends' too).
                    let _ = response_framing(&head, b"GET");
                    break;
                }
            };
            assert_eq!(request.raw, head);
            assert!(!request.method.is_empty());
            let _ = response_framing(&head, &request.method);
            let mut body = Vec::new();
            let copied = copy_body(&mut client, &mut body, request.body).await;
            body_bytes += body.len();
            assert!(body_bytes <= data.len());
            if let BodyFraming::Length(n) = request.body
                && copied.is_ok()
            {
                assert_eq!(body.len() as u64, n);
            }
            if copied.is_err() {
                break;
            }
        }
    });
});
