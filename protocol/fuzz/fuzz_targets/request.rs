//! Requests the agent decodes.
#![no_main]
use kmirror_protocol::Request;
use kmirror_protocol::codec::{decode_message, encode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = decode_message::<Request>(body) {
        assert_eq!(decode_message::<Request>(&encode_message(&request).unwrap()).unwrap(), request);
    }
});
