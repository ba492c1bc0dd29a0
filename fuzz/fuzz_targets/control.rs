//! The control-message decoder (network input): never panics, and what it accepts round-trips.
#![no_main]

use hearth_proto::control::ControlMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ControlMessage::decode(data) {
        let bytes = msg.encode().expect("re-encode");
        assert_eq!(ControlMessage::decode(&bytes).expect("decode again"), msg);
    }
});
