//! A byte stream of length-prefixed frames, as read from the tunnel: truncation, oversize
//! lengths and garbage end in a clean error, the reader's buffer never exceeds the limit, and
//! the read-ahead reader the tunnel uses yields exactly the same frames and outcome as the
//! plain one, however the bytes are split across reads, in lean mode or not, and whether the
//! payload is read by the reader or, as the tunnel does when it splices, taken from its buffer
//! and read from the stream directly (the first input byte picks the split and the modes).
#![no_main]
use kmirror_protocol::codec::{self, Frame, FrameReader, Head, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Hands out at most `chunk` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// A frame the way the tunnel reads one it splices: the header, the payload bytes already
/// buffered, then the rest straight from the stream.
async fn head_then_payload(ahead: &mut FrameReader, stream: &mut Trickle<'_>) -> Result<Option<Frame>, String> {
    match ahead.read_head(stream).await.map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(Head::Control(control)) => Ok(Some(Frame::Control(control))),
        Some(Head::Data { stream: id, len }) => {
            let mut bytes = ahead.take_buffered(len).to_vec();
            let mut rest = vec![0u8; len - bytes.len()];
            // The same message the reader's own payload read gives on a short stream.
            stream.read_exact(&mut rest).await.map_err(|_| "tunnel i/o: early eof".to_string())?;
            bytes.extend_from_slice(&rest);
            Ok(Some(Frame::Data { stream: id, bytes }))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut plain = Vec::new();
        let mut reader = data;
        let mut buf = Vec::new();
        let plain_end = loop {
            match codec::read_frame(&mut reader, &mut buf).await {
                Ok(Some(frame)) => plain.push(frame),
                Ok(None) => break "end".to_string(),
                Err(e) => break e.to_string(),
            }
            assert!(buf.len() <= MAX_FRAME);
        };
        assert!(buf.len() <= MAX_FRAME);

        let mut trickle = Trickle { data, chunk: usize::from(split & 0x3f).max(1) * 7 };
        let mut ahead = FrameReader::default();
        let mut frames = Vec::new();
        let ahead_end = loop {
            // Lean on every other frame, starting with the first or the second.
            ahead.set_lean((split & 0x40 != 0) ^ (frames.len() % 2 == 1));
            let next = if split & 0x80 != 0 {
                head_then_payload(&mut ahead, &mut trickle).await
            } else {
                ahead.read_frame(&mut trickle).await.map_err(|e| e.to_string())
            };
            match next {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break "end".to_string(),
                Err(e) => break e,
            }
        };
        assert_eq!(plain, frames);
        assert_eq!(plain_end, ahead_end);
    });
});
