//! The handshake messages, decoded on their own.
#![no_main]
use kmirror_protocol::codec::{decode_message, encode_message};
use kmirror_protocol::{Hello, HelloReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(hello) = decode_message::<Hello>(body) {
        assert_eq!(decode_message::<Hello>(&encode_message(&hello).unwrap()).unwrap(), hello);
    }
    if let Ok(reply) = decode_message::<HelloReply>(body) {
        assert_eq!(decode_message::<HelloReply>(&encode_message(&reply).unwrap()).unwrap(), reply);
    }
});
