//! Staged rollouts of OS releases (`docs/0009-updates.md`, "Staged rollouts"): what `hearthctl
//! rollout create` sends, and the rollout itself as the fleet keeps it and `hearthctl rollout
//! status` shows it. The transitions (planning waves, telling nodes, halting) are the fleet's
//! (`hearth_fleet::rollout`); this module only holds the data and the counts read from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One wave: it ends when `until_pct` of the channel's nodes have been told, and halts the
/// rollout when more than `max_failure_pct` of its own nodes failed or rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveSpec {
    /// Cumulative share of the channel's nodes covered once this wave is told, percent (1..=100,
    /// rising; the last wave is 100). The first wave is the canary.
    pub until_pct: u8,
    /// The rollout halts when more than this share of this wave's nodes failed or rolled back,
    /// percent (0: any failure halts).
    pub max_failure_pct: u8,
}

/// A maintenance window for the nodes carrying a label: they are told only inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `KEY=VALUE`: the nodes whose labels carry it.
    pub label: String,
    /// Opening time of day, UTC, `HH:MM`.
    pub start: String,
    /// Closing time of day, UTC, `HH:MM` (before `start`: the window spans midnight).
    pub end: String,
}

/// `POST /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutCreate {
    /// The update channel: every node whose desired state names it takes part.
    pub channel: String,
    /// The release version to install (signed into the channel's TUF repository).
    pub version: String,
    /// The waves, canary first.
    pub waves: Vec<WaveSpec>,
    /// Maintenance windows by label; nodes no window names may be told at any time.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// Seconds a told node has to be blessed or to fail; past it the node counts as failed
    /// (`timed_out`) in its wave, so an offline node cannot hold a wave open. Default
    /// [`DEFAULT_NODE_TIMEOUT_S`].
    #[serde(default)]
    pub node_timeout_s: Option<u64>,
}

/// A told node's time to finish its update when the request names none: 6 hours (a slow
/// download, a maintenance reboot, and a trial boot that falls back).
pub const DEFAULT_NODE_TIMEOUT_S: u64 = 6 * 3600;

fn default_node_timeout_ms() -> u64 {
    DEFAULT_NODE_TIMEOUT_S * 1000
}

/// A rollout's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Telling nodes wave by wave.
    Running,
    /// Paused by an operator: no node is told until it resumes.
    Paused,
    /// Stopped because a wave crossed its failure threshold: no node is told any more.
    Halted,
    /// Every wave completed.
    Completed,
}

impl RolloutState {
    /// The name used in the registry and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::Completed => "completed",
        }
    }
}

/// A maintenance window, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRule {
    /// Label key.
    pub key: String,
    /// Label value.
    pub value: String,
    /// Opening, minutes after midnight UTC.
    pub start_min: u16,
    /// Closing, minutes after midnight UTC.
    pub end_min: u16,
}

/// Phases of a node in a rollout before it reports: `pending` (its wave has not opened, or its
/// window is closed) and `told`; afterwards the phase of its last update report.
pub const PENDING: &str = "pending";
/// See [`PENDING`].
pub const TOLD: &str = "told";

/// The phase of a told node that was neither blessed nor failed within the rollout's node
/// timeout (the fleet's, not a report's; a later report replaces it).
pub const TIMED_OUT: &str = "timed_out";

/// The phase of a node whose heartbeats say it already runs the rollout's version when its turn
/// comes (or when the rollout is created): it is not told, and counts as a success of its wave.
pub const CURRENT: &str = "current";

/// The phase of a node that left the channel (moved to another one, revoked or deleted) before
/// it finished: it is not told any more and counts neither as a success nor as a failure of its
/// wave (`docs/0009-updates.md`, "Nodes joining and leaving").
pub const LEFT: &str = "left";

/// Phases that count as a failure of the node's update.
pub const FAILED_PHASES: &[&str] = &["failed", "check_failed", "rolled_back", TIMED_OUT];

/// One node in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    /// Node id.
    pub node: String,
    /// Its wave (index).
    pub wave: usize,
    /// Its labels when the rollout was created (they select its maintenance window).
    pub labels: BTreeMap<String, String>,
    /// When the fleet told it to update, ms since the Unix epoch.
    pub told_ms: Option<u64>,
    /// `pending`, `told`, or the phase of its last report (`downloading` … `blessed`).
    pub phase: String,
    /// Bytes done in the reported phase.
    pub bytes_done: u64,
    /// Bytes of the reported phase.
    pub bytes_total: u64,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
    /// When it last reported, ms since the Unix epoch.
    pub at_ms: Option<u64>,
}

impl NodeProgress {
    /// A node of wave `wave` not told yet ([`PENDING`]).
    pub fn pending(node: String, wave: usize, labels: BTreeMap<String, String>) -> Self {
        Self {
            node,
            wave,
            labels,
            told_ms: None,
            phase: PENDING.into(),
            bytes_done: 0,
            bytes_total: 0,
            reason: None,
            at_ms: None,
        }
    }

    /// Whether the node's update is over: blessed on the new version, already on it, failed, or
    /// left the channel.
    pub fn finished(&self) -> bool {
        self.succeeded() || self.failed() || self.phase == LEFT
    }

    /// Whether it runs the new version: blessed on it, or already on it ([`CURRENT`]).
    pub fn succeeded(&self) -> bool {
        self.phase == "blessed" || self.phase == CURRENT
    }

    /// Whether it failed or rolled back.
    pub fn failed(&self) -> bool {
        FAILED_PHASES.contains(&self.phase.as_str())
    }
}

/// A staged rollout as the fleet persists it (one JSON document per rollout in the registry,
/// written with a generation number) and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Registry id.
    pub id: u64,
    /// Channel.
    pub channel: String,
    /// Target version.
    pub version: String,
    /// Waves, canary first.
    pub waves: Vec<WaveSpec>,
    /// Maintenance windows.
    pub windows: Vec<WindowRule>,
    /// A told node's time to be blessed or fail, ms (rollouts persisted before it existed read
    /// the default).
    #[serde(default = "default_node_timeout_ms")]
    pub node_timeout_ms: u64,
    /// State.
    pub state: RolloutState,
    /// Why it halted (or who paused it).
    pub reason: Option<String>,
    /// The open wave (index).
    pub wave: usize,
    /// When each wave opened, ms since the Unix epoch.
    pub wave_opened_ms: Vec<Option<u64>>,
    /// When each wave completed.
    pub wave_done_ms: Vec<Option<u64>>,
    /// Every node, by wave then id.
    pub nodes: Vec<NodeProgress>,
    /// Creation, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last change.
    pub updated_ms: u64,
}

/// Counts of one wave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveCounts {
    /// Nodes in the wave.
    pub nodes: usize,
    /// Nodes per phase.
    pub phases: BTreeMap<String, usize>,
    /// Nodes blessed on the new version.
    pub blessed: usize,
    /// Nodes failed or rolled back.
    pub failed: usize,
    /// Nodes that already ran the version and were not told ([`CURRENT`]).
    #[serde(default)]
    pub current: usize,
    /// Nodes that left the channel before they finished ([`LEFT`]).
    #[serde(default)]
    pub left: usize,
    /// Bytes done over the wave's reporting nodes.
    pub bytes_done: u64,
    /// Bytes in all over the wave's reporting nodes.
    pub bytes_total: u64,
}

impl Rollout {
    /// Counts of wave `w`.
    pub fn counts(&self, w: usize) -> WaveCounts {
        let mut c = WaveCounts::default();
        for n in self.nodes.iter().filter(|n| n.wave == w) {
            c.nodes += 1;
            *c.phases.entry(n.phase.clone()).or_default() += 1;
            c.blessed += usize::from(n.phase == "blessed");
            c.failed += usize::from(n.failed());
            c.current += usize::from(n.phase == CURRENT);
            c.left += usize::from(n.phase == LEFT);
            c.bytes_done += n.bytes_done;
            c.bytes_total += n.bytes_total;
        }
        c
    }
}

impl WaveCounts {
    /// Nodes that still take part (not [`LEFT`]): the base of the failure threshold.
    pub fn active(&self) -> usize {
        self.nodes - self.left
    }

    /// Whether every node of the wave finished (succeeded, failed or left).
    pub fn done(&self) -> bool {
        self.blessed + self.current + self.failed + self.left >= self.nodes
    }
}
