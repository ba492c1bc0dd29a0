//! Staged rollouts (`docs/0009-updates.md`, "Staged rollouts"): the state machine.
//!
//! A rollout is a pure value ([`hearth_proto::rollout::Rollout`]) changed in memory by [`plan`],
//! [`tick`], [`report`], [`pause`] and [`resume`], and persisted by the registry as one JSON
//! document with a generation number, in the same transaction as the desired states it changes
//! (`registry::rollouts`). The fleet drives it ([`drive`], every sweep second, and
//! [`on_report`], at every node update report): [`tick`] tells the open wave's nodes whose
//! maintenance window is open (their desired state gets `update_version`), completes a wave
//! when each of its nodes is blessed or failed and opens the next, and halts the rollout when
//! a wave's failed + rolled-back share crosses its threshold. The clock is a [`Clock`], so tests
//! move through maintenance windows without waiting for them.

use std::collections::BTreeMap;
use std::sync::Arc;

use hearth_fleet_client::release::ReleaseVersion;
use hearth_proto::control::{ControlMessage, UpdateReport};
use hearth_proto::rollout::{
    DEFAULT_NODE_TIMEOUT_S, NodeProgress, PENDING, Rollout, RolloutCreate, RolloutState, TIMED_OUT,
    TOLD, WindowRule,
};

use crate::server::Fleet;

/// The most waves a rollout may have.
pub const MAX_WAVES: usize = 16;
/// The most maintenance windows a rollout may have.
pub const MAX_WINDOWS: usize = 64;
/// Bounds of a rollout's node timeout, seconds: a minute to a week.
pub const NODE_TIMEOUT_S: std::ops::RangeInclusive<u64> = 60..=7 * 86_400;

/// Why a rollout request or change is refused. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// The request is malformed.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No node is on the channel.
    #[error("no node is on channel {channel}")]
    NoNodes {
        /// The channel.
        channel: String,
    },
    /// Another rollout of the channel is running or paused.
    #[error(
        "rollout {id} of channel {channel} is {state}: pause is not enough, it must complete or halt first"
    )]
    Busy {
        /// Its id.
        id: u64,
        /// The channel.
        channel: String,
        /// Its state.
        state: &'static str,
    },
    /// The change does not apply in the rollout's state.
    #[error("rollout {id} is {state}: cannot {action}")]
    State {
        /// The rollout.
        id: u64,
        /// Its state.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// No such rollout.
    #[error("no rollout {id}")]
    Unknown {
        /// The id asked for.
        id: u64,
    },
}

/// The HTTP status of a refusal.
pub fn status_of(e: &RolloutError) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match e {
        RolloutError::Invalid { .. } => StatusCode::BAD_REQUEST,
        RolloutError::NoNodes { .. } | RolloutError::Busy { .. } | RolloutError::State { .. } => {
            StatusCode::CONFLICT
        }
        RolloutError::Unknown { .. } => StatusCode::NOT_FOUND,
    }
}

/// Time of day for maintenance windows and timestamps: the system clock, or a test's.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::now_ms()
    }
}

/// A clock a test sets (`Fleet::set_clock`).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn at(ms: u64) -> Self {
        Self(std::sync::atomic::AtomicU64::new(ms))
    }
    /// Set it.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> RolloutError {
    RolloutError::Invalid { field, problem: problem.into() }
}

/// `HH:MM` → minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Whether a window `[start, end)` (minutes of the day, UTC; spanning midnight when end <
/// start) contains `now_ms`.
pub fn in_window(start_min: u16, end_min: u16, now_ms: u64) -> bool {
    let minute = ((now_ms / 60_000) % 1440) as u16;
    if start_min <= end_min {
        (start_min..end_min).contains(&minute)
    } else {
        minute >= start_min || minute < end_min
    }
}

/// Whether a node with `labels` may be told now: no window names it, or one that does is open.
pub fn window_open(windows: &[WindowRule], labels: &BTreeMap<String, String>, now_ms: u64) -> bool {
    let mut named = false;
    for w in windows.iter().filter(|w| labels.get(&w.key) == Some(&w.value)) {
        named = true;
        if in_window(w.start_min, w.end_min, now_ms) {
            return true;
        }
    }
    !named
}

/// Check a request and plan it over the channel's nodes `(id, labels)`: nodes sorted by id are
/// cut into waves by cumulative share (rounded up, so the canary has at least one node).
pub fn plan(
    req: &RolloutCreate,
    mut nodes: Vec<(String, BTreeMap<String, String>)>,
    now_ms: u64,
) -> Result<Rollout, RolloutError> {
    if req.channel.is_empty()
        || req.channel.len() > 64
        || !req.channel.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("channel", "must be 1..=64 of [A-Za-z0-9_-]"));
    }
    req.version.parse::<ReleaseVersion>().map_err(|e| invalid("version", e.to_string()))?;
    if req.waves.is_empty() || req.waves.len() > MAX_WAVES {
        return Err(invalid("waves", format!("1..={MAX_WAVES} waves are needed")));
    }
    let mut prev = 0u8;
    for (n, w) in req.waves.iter().enumerate() {
        if w.until_pct <= prev || w.until_pct > 100 {
            return Err(invalid(
                "waves",
                format!(
                    "wave {}: until_pct {} must rise above {prev} and be at most 100",
                    n + 1,
                    w.until_pct
                ),
            ));
        }
        if w.max_failure_pct > 100 {
            return Err(invalid(
                "waves",
                format!("wave {}: max_failure_pct {} is above 100", n + 1, w.max_failure_pct),
            ));
        }
        prev = w.until_pct;
    }
    if prev != 100 {
        return Err(invalid("waves", format!("the last wave must reach 100 %, not {prev} %")));
    }
    if req.windows.len() > MAX_WINDOWS {
        return Err(invalid("windows", format!("at most {MAX_WINDOWS}")));
    }
    let mut windows = Vec::with_capacity(req.windows.len());
    for w in &req.windows {
        let Some((key, value)) = w.label.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(invalid("windows", format!("label {:?} is not KEY=VALUE", w.label)));
        };
        let (Some(start_min), Some(end_min)) = (parse_hhmm(&w.start), parse_hhmm(&w.end)) else {
            return Err(invalid(
                "windows",
                format!("{}: {}-{} is not HH:MM-HH:MM (UTC)", w.label, w.start, w.end),
            ));
        };
        if start_min == end_min {
            return Err(invalid("windows", format!("{}: the window is empty", w.label)));
        }
        windows.push(WindowRule { key: key.into(), value: value.into(), start_min, end_min });
    }
    let node_timeout_s = req.node_timeout_s.unwrap_or(DEFAULT_NODE_TIMEOUT_S);
    if !NODE_TIMEOUT_S.contains(&node_timeout_s) {
        return Err(invalid(
            "node_timeout_s",
            format!(
                "{node_timeout_s} s is outside {}..={} s (a minute to a week)",
                NODE_TIMEOUT_S.start(),
                NODE_TIMEOUT_S.end()
            ),
        ));
    }
    if nodes.is_empty() {
        return Err(RolloutError::NoNodes { channel: req.channel.clone() });
    }
    nodes.sort();
    let total = nodes.len();
    let mut out = Vec::with_capacity(total);
    let mut start = 0usize;
    for (w, spec) in req.waves.iter().enumerate() {
        let end = (total * usize::from(spec.until_pct)).div_ceil(100).max(start).min(total);
        for (node, labels) in &nodes[start..end] {
            out.push(NodeProgress {
                node: node.clone(),
                wave: w,
                labels: labels.clone(),
                told_ms: None,
                phase: PENDING.into(),
                bytes_done: 0,
                bytes_total: 0,
                reason: None,
                at_ms: None,
            });
        }
        start = end;
    }
    let n = req.waves.len();
    let mut wave_opened_ms = vec![None; n];
    wave_opened_ms[0] = Some(now_ms);
    Ok(Rollout {
        id: 0,
        channel: req.channel.clone(),
        version: req.version.clone(),
        waves: req.waves.clone(),
        windows,
        node_timeout_ms: node_timeout_s * 1000,
        state: RolloutState::Running,
        reason: None,
        wave: 0,
        wave_opened_ms,
        wave_done_ms: vec![None; n],
        nodes: out,
        created_ms: now_ms,
        updated_ms: now_ms,
    })
}

/// What a [`tick`] did: nodes to tell and lines for the event log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Nodes to tell now (their desired state gets `update_version`).
    pub tell: Vec<String>,
    /// Events (kind, message).
    pub events: Vec<(String, String)>,
}

impl Step {
    /// Whether anything changed.
    pub fn is_empty(&self) -> bool {
        self.tell.is_empty() && self.events.is_empty()
    }
}

/// Advance a running rollout at `now_ms`: tell the open wave's nodes whose window is open, mark
/// the told ones that did not finish within the node timeout `timed_out` (a failure), halt on a
/// crossed threshold, complete the wave when every node is finished and open the next.
pub fn tick(r: &mut Rollout, now_ms: u64) -> Step {
    let mut step = Step::default();
    while r.state == RolloutState::Running {
        let w = r.wave;
        let Some(spec) = r.waves.get(w).copied() else {
            r.state = RolloutState::Completed;
            break;
        };
        for n in r.nodes.iter_mut().filter(|n| n.wave == w && n.told_ms.is_none()) {
            if window_open(&r.windows, &n.labels, now_ms) {
                n.told_ms = Some(now_ms);
                n.phase = TOLD.into();
                step.tell.push(n.node.clone());
            }
        }
        let timeout = r.node_timeout_ms;
        for n in r.nodes.iter_mut().filter(|n| n.wave == w && !n.finished()) {
            let Some(told) = n.told_ms else { continue };
            if now_ms.saturating_sub(told) > timeout {
                let why = format!(
                    "not blessed or failed within {} s of being told (last phase {})",
                    timeout / 1000,
                    n.phase
                );
                step.events.push((
                    "rollout.node_timed_out".into(),
                    format!("rollout {} ({} {}): {}: {why}", r.id, r.channel, r.version, n.node),
                ));
                n.phase = TIMED_OUT.into();
                n.reason = Some(why);
            }
        }
        let c = r.counts(w);
        if c.failed * 100 > usize::from(spec.max_failure_pct) * c.nodes {
            let failed: Vec<String> = r
                .nodes
                .iter()
                .filter(|n| n.wave == w && n.failed())
                .map(|n| format!("{} {}: {}", n.node, n.phase, n.reason.as_deref().unwrap_or("-")))
                .collect();
            let why = format!(
                "wave {} of {}: {} of {} node(s) failed or rolled back, above its {} % threshold ({})",
                w + 1,
                r.waves.len(),
                c.failed,
                c.nodes,
                spec.max_failure_pct,
                failed.join("; ")
            );
            r.state = RolloutState::Halted;
            r.reason = Some(why.clone());
            step.events.push((
                "rollout.halted".into(),
                format!("rollout {} ({} {}): {why}", r.id, r.channel, r.version),
            ));
            break;
        }
        if c.blessed + c.failed < c.nodes {
            break;
        }
        r.wave_done_ms[w] = Some(now_ms);
        step.events.push((
            "rollout.wave".into(),
            format!(
                "rollout {} ({} {}): wave {} of {} complete: {} blessed, {} failed",
                r.id,
                r.channel,
                r.version,
                w + 1,
                r.waves.len(),
                c.blessed,
                c.failed
            ),
        ));
        if w + 1 >= r.waves.len() {
            r.state = RolloutState::Completed;
            step.events.push((
                "rollout.completed".into(),
                format!("rollout {} ({} {}) completed", r.id, r.channel, r.version),
            ));
            break;
        }
        r.wave = w + 1;
        r.wave_opened_ms[w + 1] = Some(now_ms);
    }
    if !step.is_empty() {
        r.updated_ms = now_ms;
    }
    step
}

/// Record a node's update report; whether it concerned this rollout. Reports about another
/// version, or from a node the rollout did not tell, are not the rollout's.
pub fn report(r: &mut Rollout, node: &str, u: &UpdateReport, now_ms: u64) -> bool {
    if u.version.as_deref() != Some(r.version.as_str()) {
        return false;
    }
    let Some(n) = r.nodes.iter_mut().find(|n| n.node == node && n.told_ms.is_some()) else {
        return false;
    };
    let phase: String =
        u.phase.chars().filter(|c| c.is_ascii_lowercase() || *c == '_').take(32).collect();
    if n.phase == phase && n.bytes_done == u.bytes_done && n.reason == u.reason {
        return false;
    }
    n.phase = phase;
    n.bytes_done = u.bytes_done;
    n.bytes_total = u.bytes_total;
    n.reason = u.reason.as_ref().map(|s| s.chars().take(512).collect());
    n.at_ms = Some(u.at_ms);
    r.updated_ms = now_ms;
    true
}

/// Pause a running rollout.
pub fn pause(r: &mut Rollout, now_ms: u64) -> Result<Step, RolloutError> {
    if r.state != RolloutState::Running {
        return Err(RolloutError::State { id: r.id, state: r.state.as_str(), action: "pause" });
    }
    r.state = RolloutState::Paused;
    r.updated_ms = now_ms;
    Ok(Step {
        tell: vec![],
        events: vec![(
            "rollout.paused".into(),
            format!("rollout {} ({} {}) paused", r.id, r.channel, r.version),
        )],
    })
}

/// Resume a paused rollout (a halted one stays halted: its failures need a new release).
pub fn resume(r: &mut Rollout, now_ms: u64) -> Result<Step, RolloutError> {
    if r.state != RolloutState::Paused {
        return Err(RolloutError::State { id: r.id, state: r.state.as_str(), action: "resume" });
    }
    r.state = RolloutState::Running;
    r.updated_ms = now_ms;
    let mut step = tick(r, now_ms);
    step.events.insert(
        0,
        (
            "rollout.resumed".into(),
            format!("rollout {} ({} {}) resumed", r.id, r.channel, r.version),
        ),
    );
    Ok(step)
}

/// Tell the nodes a step names: their desired state (already written by the registry in the
/// step's transaction) goes to their sessions.
pub async fn deliver(fleet: &Arc<Fleet>, told: Vec<(String, hearth_proto::control::DesiredState)>) {
    for (node, desired) in told {
        fleet.notify(&node, ControlMessage::Desired(desired)).await;
    }
}

/// Advance every running rollout (the sweep calls this every second).
pub async fn drive(fleet: &Arc<Fleet>) {
    let ids = match fleet.db(|r| r.running_rollouts()).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read running rollouts");
            return;
        }
    };
    for id in ids {
        let now = fleet.clock().now_ms();
        let res = fleet
            .db(move |reg| {
                reg.change_rollout(id, now, &mut |r| {
                    let step = tick(r, now);
                    Ok((!step.is_empty()).then_some(step))
                })
            })
            .await;
        match res {
            Ok((_, told)) => deliver(fleet, told).await,
            Err(e) => {
                tracing::warn!(rollout = id, error = %format!("{e:#}"), "cannot advance a rollout")
            }
        }
    }
}

/// Record a node's update report in the running rollout that told it, and advance that rollout.
pub async fn on_report(fleet: &Arc<Fleet>, node: &str, u: &UpdateReport) {
    let Some(version) = u.version.clone() else { return };
    let id = node.to_string();
    let found = fleet.db(move |reg| reg.rollout_of(&id, &version)).await;
    let rid = match found {
        Ok(Some(rid)) => rid,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%node, error = %format!("{e:#}"), "cannot find the node's rollout");
            return;
        }
    };
    let now = fleet.clock().now_ms();
    let (id, u) = (node.to_string(), u.clone());
    let res = fleet
        .db(move |reg| {
            reg.change_rollout(rid, now, &mut |r| Ok(report(r, &id, &u, now).then(|| tick(r, now))))
        })
        .await;
    match res {
        Ok((_, told)) => deliver(fleet, told).await,
        Err(e) => {
            tracing::warn!(%node, rollout = rid, error = %format!("{e:#}"), "cannot record an update report in its rollout")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::rollout::{WaveSpec, Window};

    const DAY: u64 = 86_400_000;
    /// A midnight, UTC.
    const MIDNIGHT: u64 = 20_419 * DAY;

    fn at(h: u64, m: u64) -> u64 {
        MIDNIGHT + (h * 60 + m) * 60_000
    }

    fn nodes(n: usize) -> Vec<(String, BTreeMap<String, String>)> {
        (0..n)
            .map(|i| {
                let site = if i % 2 == 0 { "ams1" } else { "fra1" };
                (format!("n{i:03}"), BTreeMap::from([("site".to_string(), site.to_string())]))
            })
            .collect()
    }

    fn req(waves: &[(u8, u8)]) -> RolloutCreate {
        RolloutCreate {
            channel: "stable".into(),
            version: "2.0".into(),
            waves: waves
                .iter()
                .map(|&(until_pct, max_failure_pct)| WaveSpec { until_pct, max_failure_pct })
                .collect(),
            windows: vec![],
            node_timeout_s: None,
        }
    }

    fn rep(phase: &str, version: &str, reason: Option<&str>) -> UpdateReport {
        UpdateReport {
            at_ms: 1,
            phase: phase.into(),
            version: Some(version.into()),
            from_version: Some("1.0".into()),
            bytes_done: 10,
            bytes_total: 100,
            reason: reason.map(Into::into),
        }
    }

    fn wave_nodes(r: &Rollout, w: usize) -> Vec<String> {
        r.nodes.iter().filter(|n| n.wave == w).map(|n| n.node.clone()).collect()
    }

    #[test]
    fn a_told_node_that_never_reports_times_out_as_a_failure_and_the_wave_moves_on()
    -> Result<(), RolloutError> {
        // 10 nodes: a canary of 1, then 9 allowing 20 % failures; 15 minutes per node.
        let mut r = plan(
            &RolloutCreate { node_timeout_s: Some(900), ..req(&[(10, 0), (100, 20)]) },
            nodes(10),
            at(1, 0),
        )?;
        assert_eq!(r.node_timeout_ms, 900_000);
        let step = tick(&mut r, at(1, 0));
        assert_eq!(step.tell, ["n000"]);
        report(&mut r, "n000", &rep("blessed", "2.0", None), at(1, 1));
        let step = tick(&mut r, at(1, 1));
        assert_eq!(step.tell.len(), 9, "wave 2 told");
        // Eight bless; n005 is offline and never reports.
        for i in (1..10).filter(|&i| i != 5) {
            report(&mut r, &format!("n{i:03}"), &rep("blessed", "2.0", None), at(1, 5));
        }
        // Within the timeout the wave waits for it.
        let step = tick(&mut r, at(1, 16));
        assert!(step.is_empty(), "{step:?}");
        assert_eq!(r.state, RolloutState::Running);
        // Past it: timed out, a failure (1 of 9 = 11 % <= 20 %), and the rollout completes.
        let step = tick(&mut r, at(1, 17));
        let n5 =
            r.nodes.iter().find(|n| n.node == "n005").map(|n| (n.phase.clone(), n.reason.clone()));
        assert_eq!(n5.as_ref().map(|n| n.0.as_str()), Some(TIMED_OUT));
        let why = n5.and_then(|n| n.1).unwrap_or_default();
        assert!(why.contains("within 900 s") && why.contains("last phase told"), "{why}");
        assert!(
            step.events.iter().any(|(k, m)| k == "rollout.node_timed_out" && m.contains("n005"))
        );
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(r.counts(1).failed, 1);
        Ok(())
    }

    #[test]
    fn a_timed_out_canary_halts_a_zero_tolerance_wave_and_bad_timeouts_are_refused()
    -> Result<(), RolloutError> {
        let mut r = plan(
            &RolloutCreate { node_timeout_s: Some(60), ..req(&[(10, 0), (100, 0)]) },
            nodes(10),
            at(1, 0),
        )?;
        tick(&mut r, at(1, 0));
        report(&mut r, "n000", &rep("downloading", "2.0", None), at(1, 0));
        tick(&mut r, at(1, 2));
        assert_eq!(r.state, RolloutState::Halted);
        let why = r.reason.clone().unwrap_or_default();
        assert!(why.contains("timed_out") && why.contains("last phase downloading"), "{why}");
        assert!(r.nodes.iter().filter(|n| n.wave == 1).all(|n| n.told_ms.is_none()));
        for bad in [0, 59, 7 * 86_400 + 1] {
            let e =
                plan(&RolloutCreate { node_timeout_s: Some(bad), ..req(&[(100, 0)]) }, nodes(2), 0)
                    .expect_err("refused");
            assert!(matches!(e, RolloutError::Invalid { field: "node_timeout_s", .. }), "{e}");
        }
        // A rollout persisted before the field existed reads the default.
        let mut v = serde_json::to_value(&r).map_err(|e| invalid("json", e.to_string()))?;
        v.as_object_mut().map(|o| o.remove("node_timeout_ms"));
        let old: Rollout = serde_json::from_value(v).map_err(|e| invalid("json", e.to_string()))?;
        assert_eq!(old.node_timeout_ms, DEFAULT_NODE_TIMEOUT_S * 1000);
        Ok(())
    }

    #[test]
    fn waves_split_by_cumulative_share_with_a_canary_of_at_least_one() -> Result<(), RolloutError> {
        let r = plan(&req(&[(5, 0), (25, 10), (100, 10)]), nodes(20), at(1, 0))?;
        let sizes: Vec<usize> = (0..3).map(|w| r.counts(w).nodes).collect();
        assert_eq!(sizes, [1, 4, 15]);
        let r = plan(&req(&[(1, 0), (50, 10), (100, 10)]), nodes(3), at(1, 0))?;
        let sizes: Vec<usize> = (0..3).map(|w| r.counts(w).nodes).collect();
        assert_eq!(sizes, [1, 1, 1]);
        Ok(())
    }

    #[test]
    fn a_clean_rollout_tells_wave_by_wave_and_completes() -> Result<(), RolloutError> {
        let mut r = plan(&req(&[(10, 0), (50, 10), (100, 10)]), nodes(10), at(1, 0))?;
        let s = tick(&mut r, at(1, 0));
        assert_eq!(s.tell, wave_nodes(&r, 0), "the canary only");
        assert!(tick(&mut r, at(1, 1)).is_empty(), "nothing new until the canary reports");
        for n in wave_nodes(&r, 0) {
            assert!(report(&mut r, &n, &rep("downloading", "2.0", None), at(1, 2)));
            assert!(tick(&mut r, at(1, 2)).tell.is_empty(), "a downloading canary holds the wave");
            assert!(report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 3)));
        }
        let s = tick(&mut r, at(1, 3));
        assert_eq!(s.tell, wave_nodes(&r, 1));
        assert_eq!(r.wave, 1);
        assert!(r.wave_done_ms[0].is_some());
        for w in 1..3 {
            for n in wave_nodes(&r, w) {
                report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 4));
            }
            tick(&mut r, at(1, 4));
        }
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(r.counts(2).blessed, 5);
        Ok(())
    }

    #[test]
    fn a_wave_over_its_threshold_halts_and_no_one_else_is_told() -> Result<(), RolloutError> {
        let mut r = plan(&req(&[(10, 0), (50, 25), (100, 10)]), nodes(10), at(1, 0))?;
        tick(&mut r, at(1, 0));
        for n in wave_nodes(&r, 0) {
            report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 1));
        }
        tick(&mut r, at(1, 1));
        let second = wave_nodes(&r, 1);
        assert_eq!(second.len(), 4);
        // One of four rolled back: 25 % is not above 25 %.
        report(&mut r, &second[0], &rep("rolled_back", "2.0", Some("GPU health worse")), at(1, 2));
        assert!(tick(&mut r, at(1, 2)).is_empty());
        assert_eq!(r.state, RolloutState::Running);
        // Two of four: halted, with the nodes and reasons named.
        report(&mut r, &second[1], &rep("failed", "2.0", Some("hash mismatch")), at(1, 3));
        let s = tick(&mut r, at(1, 3));
        assert_eq!(r.state, RolloutState::Halted);
        let why = r.reason.clone().unwrap_or_default();
        assert!(why.contains("wave 2 of 3: 2 of 4"), "{why}");
        assert!(why.contains("GPU health worse") && why.contains("hash mismatch"), "{why}");
        assert_eq!(s.events.first().map(|e| e.0.as_str()), Some("rollout.halted"));
        // The other nodes finish: nothing more is told, ever.
        for n in &second[2..] {
            report(&mut r, n, &rep("blessed", "2.0", None), at(1, 4));
        }
        assert!(tick(&mut r, at(1, 5)).tell.is_empty());
        assert!(r.nodes.iter().filter(|n| n.wave == 2).all(|n| n.told_ms.is_none()));
        assert!(resume(&mut r, at(1, 6)).is_err(), "a halted rollout does not resume");
        Ok(())
    }

    #[test]
    fn a_maintenance_window_holds_its_group_until_it_opens() -> Result<(), RolloutError> {
        let mut q = req(&[(100, 0)]);
        q.windows =
            vec![Window { label: "site=ams1".into(), start: "02:00".into(), end: "04:00".into() }];
        let mut r = plan(&q, nodes(4), at(1, 0))?;
        let s = tick(&mut r, at(1, 0));
        assert_eq!(s.tell, ["n001", "n003"], "fra1 has no window; ams1 waits");
        assert!(tick(&mut r, at(1, 59)).tell.is_empty());
        assert_eq!(tick(&mut r, at(2, 0)).tell, ["n000", "n002"]);
        // Spanning midnight.
        assert!(in_window(23 * 60, 60, at(23, 30)) && in_window(23 * 60, 60, at(0, 30)));
        assert!(!in_window(23 * 60, 60, at(1, 0)) && !in_window(120, 240, at(4, 0)));
        Ok(())
    }

    #[test]
    fn reports_of_other_versions_or_untold_nodes_are_not_the_rollouts() -> Result<(), RolloutError>
    {
        let mut r = plan(&req(&[(50, 0), (100, 0)]), nodes(2), at(1, 0))?;
        tick(&mut r, at(1, 0));
        assert!(!report(&mut r, "n000", &rep("failed", "1.9", None), at(1, 1)));
        assert!(!report(&mut r, "n001", &rep("failed", "2.0", None), at(1, 1)), "not told yet");
        assert!(!report(&mut r, "n999", &rep("failed", "2.0", None), at(1, 1)));
        assert_eq!(r.state, RolloutState::Running);
        Ok(())
    }

    #[test]
    fn pause_stops_telling_and_resume_continues() -> Result<(), RolloutError> {
        let mut r = plan(&req(&[(50, 0), (100, 0)]), nodes(2), at(1, 0))?;
        tick(&mut r, at(1, 0));
        pause(&mut r, at(1, 1))?;
        assert!(pause(&mut r, at(1, 1)).is_err());
        report(&mut r, "n000", &rep("blessed", "2.0", None), at(1, 2));
        assert!(tick(&mut r, at(1, 2)).is_empty(), "paused");
        let s = resume(&mut r, at(1, 3))?;
        assert_eq!(s.tell, ["n001"]);
        Ok(())
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases: Vec<(RolloutCreate, &str)> = vec![
            (req(&[]), "waves"),
            (req(&[(50, 0)]), "last wave must reach 100"),
            (req(&[(50, 0), (40, 0), (100, 0)]), "wave 2: until_pct 40"),
            (req(&[(100, 101)]), "max_failure_pct 101"),
            (RolloutCreate { version: "2.x".into(), ..req(&[(100, 0)]) }, "version"),
            (RolloutCreate { channel: "a b".into(), ..req(&[(100, 0)]) }, "channel"),
            (
                RolloutCreate {
                    windows: vec![Window {
                        label: "site".into(),
                        start: "02:00".into(),
                        end: "03:00".into(),
                    }],
                    ..req(&[(100, 0)])
                },
                "not KEY=VALUE",
            ),
            (
                RolloutCreate {
                    windows: vec![Window {
                        label: "site=a".into(),
                        start: "25:00".into(),
                        end: "03:00".into(),
                    }],
                    ..req(&[(100, 0)])
                },
                "not HH:MM-HH:MM",
            ),
        ];
        for (q, want) in cases {
            let e = plan(&q, nodes(3), 0).expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let e = plan(&req(&[(100, 0)]), vec![], 0).expect_err("no nodes").to_string();
        assert_eq!(e, "no node is on channel stable");
    }
}
