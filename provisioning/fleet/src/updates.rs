//! Update reports from nodes (`ControlMessage::Update`, `docs/0009-updates.md`): each phase
//! change and progress step lands in the event log as `node.update.<phase>`, a rollback with its
//! reason as `node.update.rolled_back`, so `hearthctl events` shows every node's update.

use hearth_proto::control::UpdateReport;

/// The event kind and line recorded for a report.
pub fn event_of(u: &UpdateReport) -> (String, String) {
    let mut line = match (&u.version, &u.from_version) {
        (Some(v), Some(f)) => format!("{f} -> {v}"),
        (Some(v), None) => format!("-> {v}"),
        _ => String::from("-"),
    };
    if u.bytes_total > 0 {
        line.push_str(&format!(
            ", {} / {} bytes ({}%)",
            u.bytes_done,
            u.bytes_total,
            u.bytes_done.saturating_mul(100) / u.bytes_total
        ));
    }
    if let Some(r) = &u.reason {
        line.push_str(&format!(": {r}"));
    }
    let phase: String =
        u.phase.chars().filter(|c| c.is_ascii_lowercase() || *c == '_').take(32).collect();
    (format!("node.update.{phase}"), line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollback_event_names_versions_and_reason() {
        let u = UpdateReport {
            at_ms: 1,
            phase: "rolled_back".into(),
            version: Some("2.0".into()),
            from_version: Some("1.0".into()),
            bytes_done: 0,
            bytes_total: 0,
            reason: Some("fleet session not established".into()),
        };
        let (kind, line) = event_of(&u);
        assert_eq!(kind, "node.update.rolled_back");
        assert_eq!(line, "1.0 -> 2.0: fleet session not established");
        let p = UpdateReport {
            phase: "down;loading".into(),
            bytes_done: 50,
            bytes_total: 200,
            reason: None,
            ..u
        };
        let (kind, line) = event_of(&p);
        assert_eq!(kind, "node.update.downloading");
        assert!(line.ends_with("50 / 200 bytes (25%)"), "{line}");
    }
}
