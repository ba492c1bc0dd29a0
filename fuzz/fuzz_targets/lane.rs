//! The lane control messages (network input, `hearth_proto::lane`): any bytes never panic; a
//! message that decodes re-encodes to the same bytes and offers 1..=MAX_LANES lanes.
#![no_main]

use hearth_proto::lane::{LaneMsg, MAX_LANES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = LaneMsg::decode(data) {
        if let LaneMsg::Offer { count, .. } = msg {
            assert!((1..=MAX_LANES).contains(&count));
        }
        assert_eq!(msg.encode(), data);
    }
});
