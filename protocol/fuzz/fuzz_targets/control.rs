//! Stream control and every other control message family, through the `Control` envelope.
#![no_main]
use kmirror_protocol::Control;
use kmirror_protocol::codec::{decode_message, encode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(control) = decode_message::<Control>(body) {
        assert_eq!(decode_message::<Control>(&encode_message(&control).unwrap()).unwrap(), control);
    }
});
