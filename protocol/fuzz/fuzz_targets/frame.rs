//! Frame bodies: any input decodes to a frame or a clean error; a decoded frame re-encodes to a
//! body that decodes to the same frame.
#![no_main]
use kmirror_protocol::codec::{self, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(frame) = codec::decode(body) {
        let mut out = Vec::new();
        codec::encode(&frame, &mut out).expect("a decoded frame re-encodes");
        let again: Frame = codec::decode(&out[4..]).expect("re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
