//! The session frame decoder (network input): never panics, never reads past its input, and a
//! decoded frame re-encodes to the same bytes.
#![no_main]

use hearth_proto::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, payload, used))) = frame::decode(data) {
        assert!(used <= data.len());
        assert!(header.len <= frame::MAX_PAYLOAD);
        let again =
            frame::encode_flags(header.kind, header.flags, header.stream, payload).expect("re-encode");
        assert_eq!(&again[..], &data[..used]);
    }
});
