//! Exactly-once handling of fleet commands across reconnects.
//!
//! The fleet resends every command the node has not acknowledged, in id order, at the start of each
//! control session (a command sent on a session that died may or may not have arrived, and an ack
//! may have been lost on the way back). [`CommandLog`] is the node's side of that contract: a pure
//! value holding the highest command id the node has started, saved by one atomic write
//! ([`crate::persist::Store`], `state.dir/commands.json`) *before* the command runs, so a repeat —
//! after a reconnect or an agent restart, even a reboot the command itself caused — is acked again
//! and never run twice. Design: `docs/0006-tunnel.md` ("Control messages across reconnects").

use std::collections::VecDeque;

use hearth_proto::control::CommandOutcome;
use serde::{Deserialize, Serialize};

/// Outcomes kept in memory to answer repeats with the original answer.
pub const RECENT: usize = 256;

/// What to do with an arriving command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Not seen before: persist [`CommandLog::begin`], run it, then [`CommandLog::finish`].
    New,
    /// Already started before: do not run it again; ack with this outcome.
    Repeat(CommandOutcome),
}

/// The highest command id started by this node (persisted), and recent outcomes (memory only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLog {
    /// The node the ids belong to (a log of another node id is reset).
    pub node_id: String,
    /// The highest command id started.
    pub last_id: u64,
    /// `(id, outcome)` of recent commands, newest last.
    #[serde(skip)]
    pub recent: VecDeque<(u64, CommandOutcome)>,
}

impl CommandLog {
    /// An empty log for `node_id`, or `loaded` if it belongs to that node.
    pub fn for_node(node_id: &str, loaded: Option<CommandLog>) -> Self {
        match loaded {
            Some(l) if l.node_id == node_id => l,
            _ => Self { node_id: node_id.to_string(), ..Self::default() },
        }
    }

    /// Whether command `id` is new or a repeat.
    pub fn arrival(&self, id: u64) -> Arrival {
        if id > self.last_id {
            return Arrival::New;
        }
        let outcome = self.recent.iter().find(|(i, _)| *i == id).map(|(_, o)| o.clone());
        Arrival::Repeat(outcome.unwrap_or(CommandOutcome::Accepted))
    }

    /// Mark `id` started (persist the result before running the command).
    pub fn begin(&mut self, id: u64) {
        self.last_id = self.last_id.max(id);
    }

    /// Remember the outcome of `id` for repeats.
    pub fn finish(&mut self, id: u64, outcome: CommandOutcome) {
        self.recent.push_back((id, outcome));
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_runs_once_and_repeats_get_the_first_answer() {
        let mut log = CommandLog::for_node("n1", None);
        assert_eq!(log.arrival(7), Arrival::New);
        log.begin(7);
        log.finish(7, CommandOutcome::Done);
        assert_eq!(log.arrival(7), Arrival::Repeat(CommandOutcome::Done));
        assert_eq!(log.arrival(8), Arrival::New);
        // Older ids (resent after a reconnect) are repeats too, even without a kept outcome.
        assert_eq!(log.arrival(3), Arrival::Repeat(CommandOutcome::Accepted));
    }

    #[test]
    fn only_the_persisted_part_survives_a_restart() -> Result<(), serde_json::Error> {
        let mut log = CommandLog::for_node("n1", None);
        log.begin(41);
        log.finish(41, CommandOutcome::Failed("x".into()));
        let back: CommandLog = serde_json::from_str(&serde_json::to_string(&log)?)?;
        let back = CommandLog::for_node("n1", Some(back));
        assert_eq!(back.last_id, 41);
        assert_eq!(back.arrival(41), Arrival::Repeat(CommandOutcome::Accepted));
        // Another node's log starts over.
        assert_eq!(CommandLog::for_node("n2", Some(log)).last_id, 0);
        Ok(())
    }

    #[test]
    fn recent_outcomes_are_bounded() {
        let mut log = CommandLog::for_node("n1", None);
        for id in 1..=(RECENT as u64 + 10) {
            log.begin(id);
            log.finish(id, CommandOutcome::Done);
        }
        assert_eq!(log.recent.len(), RECENT);
        assert_eq!(log.recent.front().map(|r| r.0), Some(11));
    }
}
