//! A byte stream of length-prefixed frames, as read from the tunnel: truncation, oversize
//! lengths and garbage end in a clean error, and the reader's buffer never exceeds the limit.
#![no_main]
use kmirror_protocol::codec::{self, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut reader = data;
        let mut buf = Vec::new();
        while let Ok(Some(_frame)) = codec::read_frame(&mut reader, &mut buf).await {
            assert!(buf.len() <= MAX_FRAME);
        }
        assert!(buf.len() <= MAX_FRAME);
    });
});
