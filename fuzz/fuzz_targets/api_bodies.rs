//! Bodies the local API decodes (network input: the socket, later the tunnel) and the persisted
//! power settings (disk): never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<hearth_proto::api::PowerLimitRequest>(data);
    let _ = serde_json::from_slice::<hearth_agent::api::SimInjectRequest>(data);
    let _ = serde_json::from_slice::<hearth_agent::api::SimWorkloadRequest>(data);
    let _ = serde_json::from_slice::<hearth_proto::api::NodeStatus>(data);
    let _ = serde_json::from_slice::<hearth_proto::api::PowerBudgetRequest>(data);
    let _ = serde_json::from_slice::<hearth_proto::api::PowerReport>(data);
    if let Ok(settings) = serde_json::from_slice::<hearth_proto::api::PowerSettings>(data) {
        // `POST /v1/power`: validation answers, never panics.
        let _ = hearth_agent::power::validate_settings(&settings, "gpus");
    }
    // The persisted power settings (`<state dir>/power.json`, read at boot).
    let _ = serde_json::from_slice::<hearth_agent::power::SettingsInput>(data);
    if let Ok(req) = serde_json::from_slice::<hearth_agent::api::SimInjectRequest>(data) {
        // What decodes re-encodes and decodes to the same value.
        let again = serde_json::to_vec(&req)
            .ok()
            .and_then(|v| serde_json::from_slice::<hearth_agent::api::SimInjectRequest>(&v).ok());
        assert_eq!(again.as_ref(), Some(&req));
    }
});
