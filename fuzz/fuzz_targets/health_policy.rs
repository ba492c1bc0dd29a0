//! The health policy parser (a file on disk): never panics, and what it accepts re-parses the
//! same and answers an action for any XID.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/fuzz/health.toml");
    if let Ok(policy) = hearth_agent::health::policy::Policy::parse(text, path) {
        assert_eq!(hearth_agent::health::policy::Policy::parse(text, path).ok(), Some(policy.clone()));
        for xid in [0, 13, 48, 64, 79, u64::MAX] {
            let _ = policy.xid_action(xid);
        }
    }
});
