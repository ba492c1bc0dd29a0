//! Staged rollouts: the `POST /v1/rollouts` body (network) and the rollout document the fleet
//! reads back from its registry (disk): never panic; what decodes round-trips, and a document's
//! per-wave counts never exceed its nodes.
#![no_main]

use hearth_proto::rollout::{Rollout, RolloutCreate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<RolloutCreate>(data) {
        let again =
            serde_json::to_vec(&req).ok().and_then(|v| serde_json::from_slice::<RolloutCreate>(&v).ok());
        assert_eq!(again.as_ref(), Some(&req));
    }
    if let Ok(r) = serde_json::from_slice::<Rollout>(data) {
        let mut seen = 0usize;
        for w in 0..r.waves.len().min(64) {
            let c = r.counts(w);
            assert!(c.blessed + c.failed <= c.nodes);
            seen += c.nodes;
        }
        assert!(seen <= r.nodes.len());
    }
});
