//! Rollouts in the registry (`crate::rollout`, `docs/0009-updates.md`): one row per rollout
//! holding its document (JSON) and a generation. Every change — a tick, a report, a pause — is
//! one transaction that reads the document, changes it in memory, writes it back only if the
//! generation is still the one read, and writes the desired states of the nodes it tells, so a
//! node is never told without the rollout knowing it, nor the reverse. The channel's nodes as
//! they are now (labels, and the OS version of their last heartbeat in `node_liveness`) are
//! read in the same transaction and passed to the state machine ([`crate::rollout::Channel`]).

use hearth_proto::control::DesiredState;
use hearth_proto::rollout::{Rollout, RolloutCreate, RolloutState};

use super::{
    DbError, Refusal, Registry, RegistryError, Tx, add_event, col, desired_in, i, int, json, os, s,
    text, to_json,
};
use crate::rollout::{Channel, Member, RolloutError, Step};

/// What a lost generation race says (the change is run again).
const CONFLICT: &str = "changed concurrently";

/// A change to a rollout given its channel as it is now ([`Registry::change_rollout`]).
pub type Change<'a> = dyn FnMut(&mut Rollout, &Channel) -> Result<Option<Step>, RolloutError> + 'a;

/// Nodes told by a change, with their new desired state (to push to their sessions).
pub type Told = Vec<(String, DesiredState)>;

/// The part of a stored heartbeat the rollout reads.
#[derive(serde::Deserialize)]
struct HeartbeatOs {
    versions: VersionsOs,
}

#[derive(serde::Deserialize)]
struct VersionsOs {
    os: Option<String>,
}

/// The nodes on `channel` now (not revoked): labels and the OS version their last heartbeat
/// named. A heartbeat that does not parse names no version (the node is told as before). Only
/// the channel's rows are read (the indexed `update_channel` column, kept with `desired`).
fn channel_in(tx: &mut dyn Tx, channel: &str) -> Result<Channel, RegistryError> {
    let rows = tx.query(
        "SELECT n.id, n.desired, l.heartbeat FROM nodes n \
         LEFT JOIN node_liveness l ON l.node_id = n.id \
         WHERE n.update_channel = $1 AND n.revoked = 0",
        &[text(channel)],
    )?;
    let mut out = Channel::new();
    for r in &rows {
        let id = s(col(r, 0));
        let d: DesiredState = json(col(r, 1), "desired", &id)?;
        let os = os(col(r, 2))
            .and_then(|hb| serde_json::from_str::<HeartbeatOs>(&hb).ok())
            .and_then(|hb| hb.versions.os);
        out.insert(id, Member { labels: d.labels, os });
    }
    Ok(out)
}

fn load(tx: &mut dyn Tx, id: u64) -> Result<(u64, Rollout), RegistryError> {
    let rows = tx.query("SELECT generation, body FROM rollouts WHERE id = $1", &[int(id)])?;
    let Some(r) = rows.first() else {
        return Err(Refusal::Rollout(RolloutError::Unknown { id }).into());
    };
    Ok((i(col(r, 0)) as u64, json(col(r, 1), "body", &id.to_string())?))
}

impl Registry {
    /// Plan and store a rollout over the channel's nodes (not revoked). Refused when the request
    /// is malformed, no node is on the channel, or another rollout of the channel is running or
    /// paused.
    pub fn create_rollout(
        &self,
        req: &RolloutCreate,
        now_ms: u64,
    ) -> Result<Rollout, RegistryError> {
        self.tx(|tx| {
            let busy = tx.query(
                "SELECT id, state FROM rollouts WHERE channel = $1 AND state IN ('running', 'paused') ORDER BY id",
                &[text(&req.channel)],
            )?;
            if let Some(b) = busy.first() {
                let state = if s(col(b, 1)) == "paused" { "paused" } else { "running" };
                return Err(Refusal::Rollout(RolloutError::Busy {
                    id: i(col(b, 0)) as u64,
                    channel: req.channel.clone(),
                    state,
                })
                .into());
            }
            let nodes = channel_in(tx, &req.channel)?
                .into_iter()
                .map(|(id, m)| (id, m.labels))
                .collect();
            let mut rollout =
                crate::rollout::plan(req, nodes, now_ms).map_err(Refusal::Rollout)?;
            let ins = tx.query(
                "INSERT INTO rollouts (channel, version, state, generation, body, created_ms) \
                 VALUES ($1, $2, $3, 1, '', $4) RETURNING id",
                &[
                    text(&rollout.channel),
                    text(&rollout.version),
                    text(rollout.state.as_str()),
                    int(now_ms),
                ],
            )?;
            rollout.id = ins.first().map_or(0, |r| i(col(r, 0))) as u64;
            tx.exec(
                "UPDATE rollouts SET body = $2 WHERE id = $1",
                &[int(rollout.id), text(to_json(&rollout))],
            )?;
            let per_wave: Vec<String> =
                (0..rollout.waves.len()).map(|w| rollout.counts(w).nodes.to_string()).collect();
            add_event(
                tx,
                now_ms,
                None,
                "rollout.created",
                &format!(
                    "rollout {} ({} {}): {} node(s) in waves of {}",
                    rollout.id,
                    rollout.channel,
                    rollout.version,
                    rollout.nodes.len(),
                    per_wave.join("/")
                ),
            )?;
            Ok(rollout)
        })
    }

    /// Every rollout, newest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query("SELECT id, body FROM rollouts ORDER BY id DESC", &[])?;
            rows.iter().map(|r| json(col(r, 1), "body", &s(col(r, 0)))).collect()
        })
    }

    /// One rollout.
    pub fn rollout(&self, id: u64) -> Result<Rollout, RegistryError> {
        self.rtx(|tx| Ok(load(tx, id)?.1))
    }

    /// Ids of the running and paused rollouts (a paused one still takes in nodes that join
    /// its channel).
    pub fn active_rollouts(&self) -> Result<Vec<u64>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query(
                "SELECT id FROM rollouts WHERE state IN ('running', 'paused') ORDER BY id",
                &[],
            )?;
            Ok(rows.iter().map(|r| i(col(r, 0)) as u64).collect())
        })
    }

    /// The newest rollout of `version` that told `node`, if any.
    pub fn rollout_of(&self, node: &str, version: &str) -> Result<Option<u64>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query(
                "SELECT id, body FROM rollouts WHERE version = $1 ORDER BY id DESC",
                &[text(version)],
            )?;
            for r in &rows {
                let ro: Rollout = json(col(r, 1), "body", &s(col(r, 0)))?;
                if ro.nodes.iter().any(|n| n.node == node && crate::rollout::reports_to(n)) {
                    return Ok(Some(ro.id));
                }
            }
            Ok(None)
        })
    }

    /// Change rollout `id` with `f` in one transaction, `f` getting the rollout and its channel
    /// as it is now (read only while the rollout is running or paused; empty otherwise, when
    /// the state machine takes no one in): `Ok(None)` from `f` writes nothing; a
    /// step is saved with the next generation, its events recorded and the nodes it tells given
    /// `update_version` in their desired state. A refusal from `f` changes nothing. When another
    /// transaction changed the document in between (PostgreSQL, several gateways), the whole
    /// change is run again on the new document.
    pub fn change_rollout(
        &self,
        id: u64,
        now_ms: u64,
        f: &mut Change<'_>,
    ) -> Result<(Rollout, Told), RegistryError> {
        let mut attempt = 0;
        loop {
            match self.change_rollout_once(id, now_ms, f) {
                Err(RegistryError::Db(e)) if e.what.contains(CONFLICT) && attempt < 8 => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn change_rollout_once(
        &self,
        id: u64,
        now_ms: u64,
        f: &mut Change<'_>,
    ) -> Result<(Rollout, Told), RegistryError> {
        self.tx(|tx| {
            let (generation, mut r) = load(tx, id)?;
            let channel = match r.state {
                RolloutState::Running | RolloutState::Paused => channel_in(tx, &r.channel)?,
                RolloutState::Halted | RolloutState::Completed => Channel::new(),
            };
            let Some(step) = f(&mut r, &channel).map_err(Refusal::Rollout)? else {
                return Ok((r, Vec::new()));
            };
            let n = tx.exec(
                "UPDATE rollouts SET body = $3, state = $4, generation = $5 WHERE id = $1 AND generation = $2",
                &[
                    int(id),
                    int(generation),
                    text(to_json(&r)),
                    text(r.state.as_str()),
                    int(generation + 1),
                ],
            )?;
            if n != 1 {
                return Err(RegistryError::Db(DbError {
                    backend: "registry",
                    what: format!("rollout {id} {CONFLICT} (generation {generation})"),
                    source: "another transaction wrote it first".into(),
                }));
            }
            for (kind, message) in &step.events {
                add_event(tx, now_ms, None, kind, message)?;
            }
            let mut told = Vec::with_capacity(step.tell.len());
            let version = r.version.clone();
            let what = format!("update to {} (rollout {}, wave {})", r.version, r.id, r.wave + 1);
            for node in &step.tell {
                let v = version.clone();
                match desired_in(tx, node, now_ms, &what, &move |d| {
                    d.update_version = Some(v.clone());
                }) {
                    Ok(d) => told.push((node.clone(), d)),
                    Err(RegistryError::Refused(Refusal::UnknownNode { .. })) => {
                        tracing::warn!(%node, rollout = id, "a rollout's node left the registry");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok((r, told))
        })
    }
}
