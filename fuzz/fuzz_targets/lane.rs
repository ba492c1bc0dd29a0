//! The lane control messages (network input, `hearth_proto::lane`): any bytes never panic; a
//! message that decodes offers 1..=MAX_LANES lanes and survives a re-encoding (postcard accepts
//! non-minimal varints, so the bytes themselves may differ).
#![no_main]

use hearth_proto::lane::{LaneMsg, MAX_LANES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = LaneMsg::decode(data) {
        if let LaneMsg::Offer { count, .. } = msg {
            assert!((1..=MAX_LANES).contains(&count));
        }
        assert_eq!(LaneMsg::decode(&msg.encode()).ok(), Some(msg));
    }
});
