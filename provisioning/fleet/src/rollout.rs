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
//!
//! The caller passes the channel as it is now (a [`Channel`]: its nodes, their labels and the OS
//! version their last heartbeat named), read in the same transaction: a node already on the
//! rollout's version is recorded `current` instead of being told, a node that joined the channel
//! is taken in (the open wave, or the last one while the canary is open), and a node that left
//! is recorded `left` and never told again (`docs/0009-updates.md`, "Nodes already current,
//! joining and leaving").

use std::collections::BTreeMap;
use std::sync::Arc;

use hearth_fleet_client::release::ReleaseVersion;
use hearth_proto::control::{ControlMessage, UpdateReport};
use hearth_proto::rollout::{
    CURRENT, DEFAULT_NODE_TIMEOUT_S, LEFT, NodeProgress, PENDING, Rollout, RolloutCreate,
    RolloutState, TIMED_OUT, TOLD, WindowRule,
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

/// A node on the channel now, as the registry knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    /// Its labels now (a node taken in after creation gets its maintenance window from these).
    pub labels: BTreeMap<String, String>,
    /// The OS image version its last heartbeat named (`Versions::os`), if any.
    pub os: Option<String>,
}

/// The channel's nodes now (not revoked), by id.
pub type Channel = BTreeMap<String, Member>;

/// The wave a node joining the channel after creation goes to: the open wave, except while the
/// canary (the first of several waves) is open, when it goes to the last wave, so a late node
/// never widens the canary.
pub fn join_wave(r: &Rollout) -> usize {
    if r.wave == 0 && r.waves.len() > 1 { r.waves.len() - 1 } else { r.wave }
}

fn event(r: &Rollout, kind: &str, what: String) -> (String, String) {
    (kind.into(), format!("rollout {} ({} {}): {what}", r.id, r.channel, r.version))
}

/// Bring the rollout's node list in line with the channel (a running or paused rollout only):
/// nodes on the channel that the rollout lacks (or that left and came back before being told)
/// join at [`join_wave`] (`rollout.node_joined`); nodes no longer on the channel that had not
/// finished become [`LEFT`] (`rollout.node_left`) and are never told again. A finished node that
/// leaves keeps its outcome.
pub fn sync_channel(r: &mut Rollout, channel: &Channel, now_ms: u64) -> Step {
    let mut step = Step::default();
    if !matches!(r.state, RolloutState::Running | RolloutState::Paused) {
        return step;
    }
    let wave = join_wave(r);
    // One pass over each list (a channel of thousands is read every tick).
    let index: BTreeMap<&str, usize> =
        r.nodes.iter().enumerate().map(|(i, n)| (n.node.as_str(), i)).collect();
    let mut joins: Vec<(Option<usize>, &String, &Member)> = Vec::new();
    for (node, m) in channel {
        match index.get(node.as_str()) {
            None => joins.push((None, node, m)),
            Some(&i) if r.nodes[i].phase == LEFT && r.nodes[i].told_ms.is_none() => {
                joins.push((Some(i), node, m));
            }
            Some(_) => {}
        }
    }
    for (at, node, m) in joins {
        let p = NodeProgress::pending(node.clone(), wave, m.labels.clone());
        match at {
            Some(i) => r.nodes[i] = p,
            None => r.nodes.push(p),
        }
        let what = format!("{node} joined the channel: wave {} of {}", wave + 1, r.waves.len());
        step.events.push(event(r, "rollout.node_joined", what));
    }
    let mut left = Vec::new();
    for n in r.nodes.iter_mut().filter(|n| !n.finished() && !channel.contains_key(&n.node)) {
        let why = format!("left the channel in phase {}", n.phase);
        left.push(format!("{}: {why}", n.node));
        n.phase = LEFT.into();
        n.reason = Some(why);
    }
    for what in left {
        step.events.push(event(r, "rollout.node_left", what));
    }
    if !step.is_empty() {
        // Keep the documented order: by wave, then id.
        r.nodes.sort_by(|a, b| (a.wave, &a.node).cmp(&(b.wave, &b.node)));
        r.updated_ms = now_ms;
    }
    step
}

/// Record as [`CURRENT`] each node whose heartbeat says it runs the rollout's version and that
/// was not told yet (in any wave: its turn needs nothing), or was told but has not reported
/// (its agent ignores a request for the version it runs). One `rollout.node_current` event each.
fn mark_current(r: &mut Rollout, channel: &Channel, step: &mut Step) {
    let version = r.version.clone();
    let mut found = Vec::new();
    for n in r.nodes.iter_mut().filter(|n| n.phase == PENDING || n.phase == TOLD) {
        if channel.get(&n.node).and_then(|m| m.os.as_deref()) != Some(version.as_str()) {
            continue;
        }
        let why = if n.told_ms.is_some() {
            format!("already on {version} (its heartbeat said so after it was told)")
        } else {
            format!("already on {version}: not told")
        };
        found.push(format!("{}: {why}", n.node));
        n.phase = CURRENT.into();
        n.reason = Some(why);
    }
    for what in found {
        step.events.push(event(r, "rollout.node_current", what));
    }
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
            out.push(NodeProgress::pending(node.clone(), w, labels.clone()));
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

/// Advance a rollout at `now_ms` over the channel as it is now: take in nodes that joined and
/// let go of those that left ([`sync_channel`], also while paused); then, while running, record
/// nodes already on the version as `current`, tell the open wave's other nodes whose window is
/// open, mark the told ones that did not finish within the node timeout `timed_out` (a
/// failure), halt on a crossed threshold, complete the wave when every node is finished and
/// open the next.
pub fn tick(r: &mut Rollout, now_ms: u64, channel: &Channel) -> Step {
    let mut step = sync_channel(r, channel, now_ms);
    if r.state == RolloutState::Running {
        mark_current(r, channel, &mut step);
    }
    while r.state == RolloutState::Running {
        let w = r.wave;
        let Some(spec) = r.waves.get(w).copied() else {
            r.state = RolloutState::Completed;
            break;
        };
        for n in r.nodes.iter_mut().filter(|n| n.wave == w && n.phase == PENDING) {
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
        if c.failed * 100 > usize::from(spec.max_failure_pct) * c.active() {
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
                c.active(),
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
        if !c.done() {
            break;
        }
        r.wave_done_ms[w] = Some(now_ms);
        step.events.push((
            "rollout.wave".into(),
            format!(
                "rollout {} ({} {}): wave {} of {} complete: {} blessed, {} already current, {} failed, {} left",
                r.id,
                r.channel,
                r.version,
                w + 1,
                r.waves.len(),
                c.blessed,
                c.current,
                c.failed,
                c.left
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

/// Whether a report from this node is the rollout's: it was told (and has not left), or it was
/// recorded [`CURRENT`] (a trial boot of the version that then rolls back reports so).
pub fn reports_to(n: &NodeProgress) -> bool {
    (n.told_ms.is_some() || n.phase == CURRENT) && n.phase != LEFT
}

/// Record a node's update report; whether it concerned this rollout. Reports about another
/// version, or from a node the rollout did not tell (or that left the channel), are not the
/// rollout's.
pub fn report(r: &mut Rollout, node: &str, u: &UpdateReport, now_ms: u64) -> bool {
    if u.version.as_deref() != Some(r.version.as_str()) {
        return false;
    }
    let Some(n) = r.nodes.iter_mut().find(|n| n.node == node && reports_to(n)) else {
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
pub fn resume(r: &mut Rollout, now_ms: u64, channel: &Channel) -> Result<Step, RolloutError> {
    if r.state != RolloutState::Paused {
        return Err(RolloutError::State { id: r.id, state: r.state.as_str(), action: "resume" });
    }
    r.state = RolloutState::Running;
    r.updated_ms = now_ms;
    let mut step = tick(r, now_ms, channel);
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

/// Advance every running rollout, and bring paused ones in line with their channel (the sweep
/// calls this every second).
pub async fn drive(fleet: &Arc<Fleet>) {
    let ids = match fleet.db(|r| r.active_rollouts()).await {
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
                reg.change_rollout(id, now, &mut |r, ch| {
                    let step = tick(r, now, ch);
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
            reg.change_rollout(rid, now, &mut |r, ch| {
                Ok(report(r, &id, &u, now).then(|| tick(r, now, ch)))
            })
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

    /// The rollout's own nodes as the channel, none on the target version yet.
    fn chan(r: &Rollout) -> Channel {
        r.nodes
            .iter()
            .map(|n| (n.node.clone(), Member { labels: n.labels.clone(), os: None }))
            .collect()
    }

    /// A tick over an unchanged channel.
    fn tk(r: &mut Rollout, now_ms: u64) -> Step {
        let ch = chan(r);
        tick(r, now_ms, &ch)
    }

    /// A resume over an unchanged channel.
    fn rs(r: &mut Rollout, now_ms: u64) -> Result<Step, RolloutError> {
        let ch = chan(r);
        resume(r, now_ms, &ch)
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
        let step = tk(&mut r, at(1, 0));
        assert_eq!(step.tell, ["n000"]);
        report(&mut r, "n000", &rep("blessed", "2.0", None), at(1, 1));
        let step = tk(&mut r, at(1, 1));
        assert_eq!(step.tell.len(), 9, "wave 2 told");
        // Eight bless; n005 is offline and never reports.
        for i in (1..10).filter(|&i| i != 5) {
            report(&mut r, &format!("n{i:03}"), &rep("blessed", "2.0", None), at(1, 5));
        }
        // Within the timeout the wave waits for it.
        let step = tk(&mut r, at(1, 16));
        assert!(step.is_empty(), "{step:?}");
        assert_eq!(r.state, RolloutState::Running);
        // Past it: timed out, a failure (1 of 9 = 11 % <= 20 %), and the rollout completes.
        let step = tk(&mut r, at(1, 17));
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
        tk(&mut r, at(1, 0));
        report(&mut r, "n000", &rep("downloading", "2.0", None), at(1, 0));
        tk(&mut r, at(1, 2));
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
        let s = tk(&mut r, at(1, 0));
        assert_eq!(s.tell, wave_nodes(&r, 0), "the canary only");
        assert!(tk(&mut r, at(1, 1)).is_empty(), "nothing new until the canary reports");
        for n in wave_nodes(&r, 0) {
            assert!(report(&mut r, &n, &rep("downloading", "2.0", None), at(1, 2)));
            assert!(tk(&mut r, at(1, 2)).tell.is_empty(), "a downloading canary holds the wave");
            assert!(report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 3)));
        }
        let s = tk(&mut r, at(1, 3));
        assert_eq!(s.tell, wave_nodes(&r, 1));
        assert_eq!(r.wave, 1);
        assert!(r.wave_done_ms[0].is_some());
        for w in 1..3 {
            for n in wave_nodes(&r, w) {
                report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 4));
            }
            tk(&mut r, at(1, 4));
        }
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(r.counts(2).blessed, 5);
        Ok(())
    }

    #[test]
    fn a_wave_over_its_threshold_halts_and_no_one_else_is_told() -> Result<(), RolloutError> {
        let mut r = plan(&req(&[(10, 0), (50, 25), (100, 10)]), nodes(10), at(1, 0))?;
        tk(&mut r, at(1, 0));
        for n in wave_nodes(&r, 0) {
            report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 1));
        }
        tk(&mut r, at(1, 1));
        let second = wave_nodes(&r, 1);
        assert_eq!(second.len(), 4);
        // One of four rolled back: 25 % is not above 25 %.
        report(&mut r, &second[0], &rep("rolled_back", "2.0", Some("GPU health worse")), at(1, 2));
        assert!(tk(&mut r, at(1, 2)).is_empty());
        assert_eq!(r.state, RolloutState::Running);
        // Two of four: halted, with the nodes and reasons named.
        report(&mut r, &second[1], &rep("failed", "2.0", Some("hash mismatch")), at(1, 3));
        let s = tk(&mut r, at(1, 3));
        assert_eq!(r.state, RolloutState::Halted);
        let why = r.reason.clone().unwrap_or_default();
        assert!(why.contains("wave 2 of 3: 2 of 4"), "{why}");
        assert!(why.contains("GPU health worse") && why.contains("hash mismatch"), "{why}");
        assert_eq!(s.events.first().map(|e| e.0.as_str()), Some("rollout.halted"));
        // The other nodes finish: nothing more is told, ever.
        for n in &second[2..] {
            report(&mut r, n, &rep("blessed", "2.0", None), at(1, 4));
        }
        assert!(tk(&mut r, at(1, 5)).tell.is_empty());
        assert!(r.nodes.iter().filter(|n| n.wave == 2).all(|n| n.told_ms.is_none()));
        assert!(rs(&mut r, at(1, 6)).is_err(), "a halted rollout does not resume");
        Ok(())
    }

    #[test]
    fn a_maintenance_window_holds_its_group_until_it_opens() -> Result<(), RolloutError> {
        let mut q = req(&[(100, 0)]);
        q.windows =
            vec![Window { label: "site=ams1".into(), start: "02:00".into(), end: "04:00".into() }];
        let mut r = plan(&q, nodes(4), at(1, 0))?;
        let s = tk(&mut r, at(1, 0));
        assert_eq!(s.tell, ["n001", "n003"], "fra1 has no window; ams1 waits");
        assert!(tk(&mut r, at(1, 59)).tell.is_empty());
        assert_eq!(tk(&mut r, at(2, 0)).tell, ["n000", "n002"]);
        // Spanning midnight.
        assert!(in_window(23 * 60, 60, at(23, 30)) && in_window(23 * 60, 60, at(0, 30)));
        assert!(!in_window(23 * 60, 60, at(1, 0)) && !in_window(120, 240, at(4, 0)));
        Ok(())
    }

    #[test]
    fn reports_of_other_versions_or_untold_nodes_are_not_the_rollouts() -> Result<(), RolloutError>
    {
        let mut r = plan(&req(&[(50, 0), (100, 0)]), nodes(2), at(1, 0))?;
        tk(&mut r, at(1, 0));
        assert!(!report(&mut r, "n000", &rep("failed", "1.9", None), at(1, 1)));
        assert!(!report(&mut r, "n001", &rep("failed", "2.0", None), at(1, 1)), "not told yet");
        assert!(!report(&mut r, "n999", &rep("failed", "2.0", None), at(1, 1)));
        assert_eq!(r.state, RolloutState::Running);
        Ok(())
    }

    #[test]
    fn pause_stops_telling_and_resume_continues() -> Result<(), RolloutError> {
        let mut r = plan(&req(&[(50, 0), (100, 0)]), nodes(2), at(1, 0))?;
        tk(&mut r, at(1, 0));
        pause(&mut r, at(1, 1))?;
        assert!(pause(&mut r, at(1, 1)).is_err());
        report(&mut r, "n000", &rep("blessed", "2.0", None), at(1, 2));
        assert!(tk(&mut r, at(1, 2)).is_empty(), "paused");
        let s = rs(&mut r, at(1, 3))?;
        assert_eq!(s.tell, ["n001"]);
        Ok(())
    }

    fn phase_of(r: &Rollout, node: &str) -> String {
        r.nodes.iter().find(|n| n.node == node).map(|n| n.phase.clone()).unwrap_or_default()
    }

    fn kinds(s: &Step, kind: &str) -> Vec<String> {
        s.events.iter().filter(|(k, _)| k == kind).map(|(_, m)| m.clone()).collect()
    }

    #[test]
    fn nodes_already_on_the_version_are_current_not_told_and_count_as_successes()
    -> Result<(), RolloutError> {
        // Canary of 1 (n000) and 3 more, zero tolerance; n000 and n002 already run 2.0.
        let mut r = plan(&req(&[(25, 0), (100, 0)]), nodes(4), at(1, 0))?;
        let mut ch = chan(&r);
        for n in ["n000", "n002"] {
            ch.entry(n.into()).or_default().os = Some("2.0".into());
        }
        ch.entry("n003".into()).or_default().os = Some("1.0".into());
        let s = tick(&mut r, at(1, 0), &ch);
        // Both are recorded at once (any wave); the canary is done without telling anyone, the
        // second wave opens and only its nodes not on 2.0 are told.
        assert_eq!(s.tell, ["n001", "n003"]);
        let current = kinds(&s, "rollout.node_current");
        assert_eq!(current.len(), 2, "{current:?}");
        assert!(current[0].contains("n000: already on 2.0: not told"), "{current:?}");
        assert_eq!((phase_of(&r, "n000"), phase_of(&r, "n002")), (CURRENT.into(), CURRENT.into()));
        assert!(r.nodes.iter().filter(|n| n.phase == CURRENT).all(|n| n.told_ms.is_none()));
        let c0 = r.counts(0);
        assert_eq!((c0.current, c0.failed, c0.blessed), (1, 0, 0));
        assert!(r.wave_done_ms[0].is_some() && r.wave == 1);
        assert!(kinds(&s, "rollout.wave")[0].contains("0 blessed, 1 already current, 0 failed"));
        // Long past the node timeout a current node never times out.
        for n in ["n001", "n003"] {
            report(&mut r, n, &rep("blessed", "2.0", None), at(1, 5));
        }
        let s = tick(&mut r, at(9, 0), &ch);
        assert!(kinds(&s, "rollout.node_timed_out").is_empty(), "{s:?}");
        assert_eq!(r.state, RolloutState::Completed);
        let c1 = r.counts(1);
        assert_eq!((c1.blessed, c1.current, c1.failed), (2, 1, 0));
        Ok(())
    }

    #[test]
    fn a_told_node_whose_heartbeat_shows_the_version_is_current_and_a_rollback_still_counts()
    -> Result<(), RolloutError> {
        // Told before its first heartbeat reached the registry: the agent ignores the request
        // for the version it runs, so without this it would time out and halt the wave.
        let mut r = plan(
            &RolloutCreate { node_timeout_s: Some(600), ..req(&[(100, 0)]) },
            nodes(3),
            at(1, 0),
        )?;
        let mut ch = chan(&r);
        assert_eq!(tick(&mut r, at(1, 0), &ch).tell.len(), 3);
        ch.entry("n001".into()).or_default().os = Some("2.0".into());
        // n002 reports it is downloading: a report, not a bare `told`, is never overridden.
        report(&mut r, "n002", &rep("downloading", "2.0", None), at(1, 1));
        ch.entry("n002".into()).or_default().os = Some("2.0".into());
        let s = tick(&mut r, at(1, 2), &ch);
        assert_eq!(phase_of(&r, "n001"), CURRENT);
        assert_eq!(phase_of(&r, "n002"), "downloading");
        assert!(kinds(&s, "rollout.node_current")[0].contains("after it was told"), "{s:?}");
        // A node recorded current that then reports a rollback of 2.0 (it was on a trial boot)
        // is a failure of its wave: the report is the rollout's.
        assert!(report(&mut r, "n001", &rep("rolled_back", "2.0", Some("no fleet")), at(1, 3)));
        tick(&mut r, at(1, 3), &ch);
        assert_eq!(r.state, RolloutState::Halted);
        assert!(r.reason.clone().unwrap_or_default().contains("n001 rolled_back: no fleet"));
        Ok(())
    }

    #[test]
    fn late_nodes_join_the_last_wave_while_the_canary_is_open_then_the_open_wave()
    -> Result<(), RolloutError> {
        // Waves of 1, 1, 2 over n000..n003.
        let mut r = plan(&req(&[(25, 0), (50, 0), (100, 0)]), nodes(4), at(1, 0))?;
        let mut ch = chan(&r);
        assert_eq!(tick(&mut r, at(1, 0), &ch).tell, ["n000"]);
        ch.insert("m1".into(), Member { labels: BTreeMap::new(), os: None });
        let s = tick(&mut r, at(1, 1), &ch);
        assert!(s.tell.is_empty(), "a late node never widens the canary: {s:?}");
        let joined = kinds(&s, "rollout.node_joined");
        assert_eq!(joined.len(), 1);
        assert!(joined[0].contains("m1 joined the channel: wave 3 of 3"), "{joined:?}");
        assert_eq!(r.nodes.iter().find(|n| n.node == "m1").map(|n| n.wave), Some(2));
        assert_eq!(r.counts(0).nodes, 1, "the canary is still one node");
        // The canary passes; the second wave opens. A node joining now goes to it and is told
        // at once (its window being open).
        report(&mut r, "n000", &rep("blessed", "2.0", None), at(1, 2));
        assert_eq!(tick(&mut r, at(1, 2), &ch).tell, ["n001"]);
        ch.insert("m2".into(), Member { labels: BTreeMap::new(), os: None });
        let s = tick(&mut r, at(1, 3), &ch);
        assert_eq!(s.tell, ["m2"]);
        assert!(kinds(&s, "rollout.node_joined")[0].contains("m2 joined the channel: wave 2 of 3"));
        // The nodes stay ordered by wave, then id.
        let order: Vec<(usize, &str)> = r.nodes.iter().map(|n| (n.wave, n.node.as_str())).collect();
        assert_eq!(
            order,
            [(0, "n000"), (1, "m2"), (1, "n001"), (2, "m1"), (2, "n002"), (2, "n003")]
        );
        // Nothing joins twice.
        assert!(tick(&mut r, at(1, 3), &ch).is_empty());
        for n in ["m2", "n001"] {
            report(&mut r, n, &rep("blessed", "2.0", None), at(1, 4));
        }
        let s = tick(&mut r, at(1, 4), &ch);
        assert_eq!(s.tell, ["m1", "n002", "n003"]);
        Ok(())
    }

    #[test]
    fn nodes_leaving_the_channel_are_not_told_and_count_neither_way() -> Result<(), RolloutError> {
        // Waves of 1 and 3 over n000..n003, zero tolerance.
        let mut r = plan(&req(&[(25, 0), (100, 0)]), nodes(4), at(1, 0))?;
        let mut ch = chan(&r);
        tick(&mut r, at(1, 0), &ch);
        // n003 (second wave, pending) moves to another channel before its wave opens.
        ch.remove("n003");
        let s = tick(&mut r, at(1, 1), &ch);
        assert!(
            kinds(&s, "rollout.node_left")[0].contains("n003: left the channel in phase pending")
        );
        assert_eq!(phase_of(&r, "n003"), LEFT);
        report(&mut r, "n000", &rep("blessed", "2.0", None), at(1, 2));
        let s = tick(&mut r, at(1, 2), &ch);
        assert_eq!(s.tell, ["n001", "n002"], "a node that left is never told");
        // n002, told, leaves mid-update: not a failure, and its later reports are not the
        // rollout's (it would otherwise hold the wave open until it timed out).
        ch.remove("n002");
        tick(&mut r, at(1, 3), &ch);
        assert_eq!(phase_of(&r, "n002"), LEFT);
        assert!(!report(&mut r, "n002", &rep("failed", "2.0", Some("x")), at(1, 4)));
        report(&mut r, "n001", &rep("blessed", "2.0", None), at(1, 5));
        let s = tick(&mut r, at(1, 5), &ch);
        assert_eq!(r.state, RolloutState::Completed, "{s:?}");
        let c = r.counts(1);
        assert_eq!((c.nodes, c.left, c.blessed, c.failed, c.active()), (3, 2, 1, 0, 1));
        assert!(
            kinds(&s, "rollout.wave")[0].contains("1 blessed, 0 already current, 0 failed, 2 left")
        );
        // A finished node that leaves keeps its outcome; a completed rollout takes in no one.
        ch.remove("n000");
        ch.insert("m1".into(), Member::default());
        let before = r.clone();
        assert!(tick(&mut r, at(1, 6), &ch).is_empty());
        assert_eq!(r, before);
        Ok(())
    }

    #[test]
    fn a_paused_rollout_takes_in_joiners_and_a_node_that_comes_back_rejoins()
    -> Result<(), RolloutError> {
        let mut r = plan(&req(&[(50, 0), (100, 0)]), nodes(4), at(1, 0))?;
        let mut ch = chan(&r);
        tick(&mut r, at(1, 0), &ch);
        pause(&mut r, at(1, 1))?;
        ch.insert("m1".into(), Member::default());
        ch.remove("n003");
        let s = tick(&mut r, at(1, 2), &ch);
        assert!(s.tell.is_empty(), "paused: no one told");
        assert_eq!(kinds(&s, "rollout.node_joined").len(), 1);
        assert_eq!(phase_of(&r, "n003"), LEFT);
        // n003 comes back before it was told: it rejoins (last wave, the canary being open).
        ch.insert("n003".into(), Member::default());
        let s = tick(&mut r, at(1, 3), &ch);
        assert!(kinds(&s, "rollout.node_joined")[0].contains("n003 joined"));
        assert_eq!(phase_of(&r, "n003"), PENDING);
        assert_eq!(r.nodes.iter().filter(|n| n.node == "n003").count(), 1);
        for n in wave_nodes(&r, 0) {
            report(&mut r, &n, &rep("blessed", "2.0", None), at(1, 4));
        }
        let s = resume(&mut r, at(1, 4), &ch)?;
        assert_eq!(s.tell, ["m1", "n002", "n003"]);
        // A halted rollout takes in no one either.
        report(&mut r, "m1", &rep("failed", "2.0", Some("x")), at(1, 5));
        tick(&mut r, at(1, 5), &ch);
        assert_eq!(r.state, RolloutState::Halted);
        ch.insert("m2".into(), Member::default());
        assert!(tick(&mut r, at(1, 6), &ch).is_empty());
        assert!(r.nodes.iter().all(|n| n.node != "m2"));
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
