//! What the agent tells about the update: the persisted state read for `GET /v1/update` and
//! `hearth-agent status`, and the report sent to the fleet when the phase changes or another
//! tenth of the bytes is done.

use std::path::Path;

use hearth_proto::control::UpdateReport;

use super::state::{Phase, UpdateState};
use crate::persist::{PersistError, Store};

/// The update state under `state_dir` (default when none was saved).
pub fn read_state(state_dir: &Path) -> Result<UpdateState, PersistError> {
    Ok(read_saved(state_dir)?.1)
}

/// The update state under `state_dir` with its save generation (0 and the default when none
/// was saved).
pub fn read_saved(state_dir: &Path) -> Result<(u64, UpdateState), PersistError> {
    Ok(Store::new(state_dir.join("update.json"))
        .load()?
        .map(|l| (l.generation, l.state))
        .unwrap_or_default())
}

/// The marker of what was last reported: phase and tenth of the bytes.
pub type Marker = (Phase, u64);

/// A report for the fleet when `state` differs from what `last` recorded; with the new marker.
pub fn due(
    state: &UpdateState,
    last: Option<&Marker>,
    now_ms: u64,
) -> Option<(UpdateReport, Marker)> {
    if state.phase == Phase::Idle {
        return None;
    }
    let tenth = state.bytes_done.saturating_mul(10).checked_div(state.bytes_total).unwrap_or(0);
    let marker = (state.phase, tenth);
    if last == Some(&marker) {
        return None;
    }
    let report = UpdateReport {
        at_ms: now_ms,
        phase: state.phase.as_str().to_string(),
        version: state.target.as_ref().map(|t| t.version.to_string()),
        from_version: state.from_version.as_ref().map(ToString::to_string),
        bytes_done: state.bytes_done,
        bytes_total: state.bytes_total,
        reason: state.reason.clone(),
    };
    Some((report, marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_on_phase_change_and_each_tenth() {
        let mut s =
            UpdateState { phase: Phase::Downloading, bytes_total: 1000, ..Default::default() };
        let (r, m) = due(&s, None, 5).expect("first report");
        assert_eq!(r.phase, "downloading");
        assert!(due(&s, Some(&m), 6).is_none(), "nothing new");
        s.bytes_done = 50;
        assert!(due(&s, Some(&m), 6).is_none(), "less than a tenth");
        s.bytes_done = 100;
        let (r, m) = due(&s, Some(&m), 7).expect("a tenth more");
        assert_eq!(r.bytes_done, 100);
        s.phase = Phase::RolledBack;
        s.reason = Some("GPU health worse".into());
        let (r, _) = due(&s, Some(&m), 8).expect("phase change");
        assert_eq!(r.reason.as_deref(), Some("GPU health worse"));
        assert!(due(&UpdateState::default(), None, 9).is_none(), "idle is not reported");
    }
}
