//! Responses the supervisor decodes.
#![no_main]
use kmirror_protocol::Response;
use kmirror_protocol::codec::{decode_message, encode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(response) = decode_message::<Response>(body) {
        assert_eq!(decode_message::<Response>(&encode_message(&response).unwrap()).unwrap(), response);
    }
});
