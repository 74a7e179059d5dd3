//! A byte stream of length-prefixed frames, as read from the tunnel: truncation, oversize
//! lengths and garbage end in a clean error, the reader's buffer never exceeds the limit, and
//! the read-ahead reader the tunnel uses yields exactly the same frames and outcome as the
//! plain one, however the bytes are split across reads (the first input byte picks the split).
#![no_main]
use kmirror_protocol::codec::{self, FrameReader, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

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

        let mut trickle = Trickle { data, chunk: usize::from(split).max(1) * 7 };
        let mut ahead = FrameReader::default();
        let mut frames = Vec::new();
        let ahead_end = loop {
            match ahead.read_frame(&mut trickle).await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break "end".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        assert_eq!(plain, frames);
        assert_eq!(plain_end, ahead_end);
    });
});
