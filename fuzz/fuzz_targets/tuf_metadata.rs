//! The update metadata parsers (network input): TUF roles as `tough` decodes them, the release
//! listing Hearth reads from `targets.json` custom fields, and the `roothash=` scan of a UKI.
//! None may panic; every listed release is complete and named as its version says.
#![no_main]

use hearth_fleet_client::release::{Part, releases_in, uki_roothash};
use libfuzzer_sys::fuzz_target;
use tough::schema::{Root, Signed, Snapshot, Targets, Timestamp};

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = serde_json::from_slice::<Signed<Root>>(data) {
        // A self-signed root from the network: verification may fail, never panic.
        let _ = root.signed.verify_role(&root);
    }
    let _ = serde_json::from_slice::<Signed<Timestamp>>(data);
    let _ = serde_json::from_slice::<Signed<Snapshot>>(data);
    if let Ok(targets) = serde_json::from_slice::<Signed<Targets>>(data) {
        for r in releases_in(&targets.signed) {
            assert_eq!(r.parts.len(), Part::ALL.len());
            for (part, t) in &r.parts {
                assert_eq!(t.name, part.file_name(&r.version));
            }
        }
    }
    if let Some(h) = uki_roothash(data) {
        assert_eq!(h.len(), 64);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
    }
});
