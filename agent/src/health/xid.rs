//! The XID action table, after NVIDIA's XID catalogue (k8s-device-plugin and gpud agree).
//!
//! | XID | meaning | action |
//! |---|---|---|
//! | 13, 31, 43, 45, 68 | application faults | none: the GPU stays healthy (restart the job) |
//! | 48, 74, 79, 92, 95, 119, 120 | DBE, NVLink, off the bus, SBE rate, uncontained ECC, GSP | quarantine, reset when idle |
//! | 64 | row remap / page retirement failure | quarantine, reset; RMA hint when it recurs |
//! | 63, 94 | remap pending / contained ECC | reset when idle |
//! | any other | unknown | watch: reported and counted |
//!
//! `[xid] overrides` in the policy file replace entries ([`super::policy::Policy::xid_action`]).

use hearth_proto::api::HealthAction;

/// Application faults: the GPU is fine, the job is not.
pub const APPLICATION_XIDS: [u64; 5] = [13, 31, 43, 45, 68];
/// XIDs that take the GPU out of service until a reset.
pub const QUARANTINE_XIDS: [u64; 7] = [48, 74, 79, 92, 95, 119, 120];
/// XIDs that ask for a reset when the GPU is idle.
pub const RESET_WHEN_IDLE_XIDS: [u64; 2] = [63, 94];
/// Row-remap / retirement failure: quarantine, RMA when it recurs.
pub const REMAP_FAILURE_XID: u64 = 64;

/// The built-in action for `xid`.
pub fn default_action(xid: u64) -> HealthAction {
    if APPLICATION_XIDS.contains(&xid) {
        HealthAction::None
    } else if QUARANTINE_XIDS.contains(&xid) || xid == REMAP_FAILURE_XID {
        HealthAction::Quarantine
    } else if RESET_WHEN_IDLE_XIDS.contains(&xid) {
        HealthAction::ResetWhenIdle
    } else {
        HealthAction::Watch
    }
}

/// A short meaning for the reason text.
pub fn meaning(xid: u64) -> &'static str {
    match xid {
        13 => "graphics engine exception (application fault)",
        31 => "GPU memory page fault (application fault)",
        43 => "GPU stopped processing (application fault)",
        45 => "preemptive cleanup (application fault)",
        68 => "video processor exception (application fault)",
        48 => "double-bit ECC error",
        63 => "row remap pending / page retired",
        64 => "row remap / page retirement failure",
        74 => "NVLink error",
        79 => "fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 => "GSP RPC timeout",
        120 => "GSP error",
        _ => "unknown XID",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_follows_the_catalogue() {
        for x in APPLICATION_XIDS {
            assert_eq!(default_action(x), HealthAction::None, "XID {x}");
        }
        for x in QUARANTINE_XIDS.into_iter().chain([64]) {
            assert_eq!(default_action(x), HealthAction::Quarantine, "XID {x}");
        }
        for x in RESET_WHEN_IDLE_XIDS {
            assert_eq!(default_action(x), HealthAction::ResetWhenIdle, "XID {x}");
        }
        assert_eq!(default_action(12345), HealthAction::Watch);
    }
}
