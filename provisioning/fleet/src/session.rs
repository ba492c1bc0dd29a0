//! The fleet side of a node's `hearth/1` control session.
//!
//! Hello → (version check, node not revoked) → Welcome, the current desired state and every
//! command the node has not acknowledged (sent before or not), in id order; then heartbeats
//! (acked at once, kept in memory, written to the registry in batches by the sweep task) and
//! command acks. A node silent for 3 heartbeat intervals is shown offline; a newer session of the
//! same node replaces the older one.

use std::sync::Arc;
use std::time::Duration;

use hearth_fleet_client::session::{read_message, write_message};
use hearth_proto::control::{
    self, Command, ControlMessage, HEARTBEAT_INTERVAL_S, Refusal, Welcome,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ca::Peer;
use crate::server::{Fleet, Live, is_fresh};

/// Time allowed for the Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages queued to one session before it is considered stuck.
pub const QUEUE: usize = 64;

async fn refuse<S: AsyncWrite + Unpin>(w: &mut S, reason: String, revoked: bool) {
    tracing::info!(%reason, "session refused");
    let _ = write_message(w, &ControlMessage::Refused(Refusal { reason, revoked })).await;
    // The refusal is the last message: end the direction (on a tunnel's session stream, so the
    // stream is finished after it, not reset ahead of it).
    let _ = w.shutdown().await;
}

/// Serve one session until the node goes, the session is replaced or the fleet stops.
pub async fn serve<S>(fleet: Arc<Fleet>, stream: S, peer: Peer, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let Peer::Node(node) = peer else {
        refuse(&mut writer, "a node certificate is required for hearth/1".into(), false).await;
        return;
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_message(&mut reader)).await {
        Ok(Ok(ControlMessage::Hello(h))) => h,
        Ok(Ok(other)) => {
            refuse(&mut writer, format!("expected Hello, got {}", kind(&other)), false).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%node, error = %format!("{e:#}"), "session ended before Hello");
            return;
        }
        Err(_) => return,
    };
    let version = match control::negotiate(control::PROTOCOL_VERSION, hello.protocol_version) {
        Ok(v) => v,
        Err(e) => {
            refuse(&mut writer, e.to_string(), false).await;
            return;
        }
    };
    let missed = fleet.missed_pushes();
    let id = node.clone();
    let row = match fleet.db(move |r| r.node(&id)).await {
        Ok(Some(n)) if !n.revoked => n,
        Ok(Some(_)) => {
            refuse(&mut writer, format!("node {node} is revoked"), true).await;
            return;
        }
        Ok(None) => {
            refuse(&mut writer, format!("node {node} is not in this fleet's registry"), true).await;
            return;
        }
        Err(e) => {
            refuse(&mut writer, format!("registry unavailable: {e}"), false).await;
            return;
        }
    };

    let (tx, mut rx) = mpsc::channel::<ControlMessage>(QUEUE);
    let session = fleet.next_session();
    let now = crate::now_ms();
    let kill = CancellationToken::new();
    let was_online = {
        let mut live = fleet.live();
        let prev = live.insert(
            node.clone(),
            Live {
                session,
                last_seen_ms: now,
                heartbeat: None,
                protocol_version: version,
                tx: Some(tx.clone()),
                dirty: true,
                online: true,
                kill: kill.clone(),
            },
        );
        if let Some(p) = &prev {
            p.kill.cancel();
        }
        prev.is_some_and(|p| p.online && is_fresh(p.last_seen_ms, now))
    };
    if !was_online {
        let msg = format!("session open (protocol {version}, agent {})", hello.agent_version);
        fleet.later_event(&node, "online", msg, now);
    }
    tracing::info!(%node, version, agent = %hello.agent_version, "session open");

    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: version,
        node_id: node.clone(),
        heartbeat_interval_s: HEARTBEAT_INTERVAL_S,
    });
    drop(tx);
    // A desired state committed after the row was read and pushed before this session was in
    // `live` reached no one: read it again (rare: only when some push missed meanwhile).
    let mut desired = row.desired.clone();
    if fleet.missed_pushes() != missed {
        let id = node.clone();
        match fleet.db(move |r| r.node(&id)).await {
            Ok(Some(n)) => desired = n.desired,
            Ok(None) => {}
            Err(e) => tracing::warn!(%node, error = %format!("{e:#}"), "desired state not re-read"),
        }
    }

    let (wfleet, wnode) = (fleet.clone(), node.clone());
    let writer_task = tokio::spawn(async move {
        let first = [welcome, ControlMessage::Desired(desired)];
        for msg in &first {
            if write_message(&mut writer, msg).await.is_err() {
                return;
            }
        }
        // Every unacknowledged command, oldest first, then whatever is pushed; a pushed command
        // only wakes the writer, which sends from the registry in id order, so the node sees
        // each session's commands in order with no gap (`docs/0006-tunnel.md`).
        let mut commands = Commands { fleet: wfleet, node: wnode, last_sent: 0 };
        if commands.send_unacked(&mut writer).await.is_err() {
            return;
        }
        // Whatever is queued when the writer wakes goes out as one write (one TLS record, one
        // syscall): acks and desired states are encoded into `out`, which is flushed before a
        // command is sent from the registry and when the queue is empty.
        let mut out = Vec::with_capacity(256);
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    ControlMessage::Command(c) if c.id <= commands.last_sent => {}
                    ControlMessage::Command(_) => {
                        if flush_out(&mut writer, &mut out).await.is_err()
                            || commands.send_unacked(&mut writer).await.is_err()
                        {
                            return;
                        }
                    }
                    other => match other.to_frame() {
                        Ok(frame) => out.extend_from_slice(&frame),
                        Err(e) => {
                            tracing::warn!(node = %commands.node, error = %e, "cannot encode a message");
                        }
                    },
                }
                next = rx.try_recv().ok();
            }
            if flush_out(&mut writer, &mut out).await.is_err() {
                return;
            }
        }
    });

    let silence = Duration::from_secs(
        u64::from(HEARTBEAT_INTERVAL_S * control::MISSED_HEARTBEATS_OFFLINE) + 5,
    );
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => break,
            () = kill.cancelled() => {
                tracing::info!(%node, "session ended by the fleet (revoked or replaced)");
                break;
            }
            r = tokio::time::timeout(silence, read_message(&mut reader)) => match r {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    tracing::debug!(%node, error = %format!("{e:#}"), "session ended");
                    break;
                }
                Err(_) => {
                    tracing::info!(%node, "session silent too long: closing");
                    break;
                }
            },
        };
        match msg {
            ControlMessage::Heartbeat(hb) => {
                let seq = hb.seq;
                let tx = {
                    let mut live = fleet.live();
                    match live.get_mut(&node) {
                        Some(l) if l.session == session => {
                            l.last_seen_ms = crate::now_ms();
                            l.heartbeat = Some(hb);
                            l.dirty = true;
                            if !l.online {
                                l.online = true;
                            }
                            l.tx.clone()
                        }
                        _ => None,
                    }
                };
                // Replaced by a newer session: this one ends.
                let Some(tx) = tx else { break };
                let _ = tx.try_send(ControlMessage::HeartbeatAck { seq });
            }
            ControlMessage::CommandAck(ack) => {
                let id = node.clone();
                let now = crate::now_ms();
                if let Err(e) =
                    fleet.db(move |r| r.ack_command(&id, ack.id, &ack.outcome, now)).await
                {
                    tracing::warn!(%node, error = %format!("{e:#}"), "cannot record a command ack");
                }
            }
            ControlMessage::Summaries(batch) => {
                let Some(last) = batch.iter().map(|s| s.seq).max() else { continue };
                let id = node.clone();
                let n = batch.len();
                match fleet.db(move |r| r.store_summaries(&id, &batch)).await {
                    Ok(()) => {
                        tracing::info!(%node, summaries = n, up_to = last, "offline summaries stored");
                        let tx = fleet.live().get(&node).and_then(|l| l.tx.clone());
                        if let Some(tx) = tx {
                            let _ = tx.try_send(ControlMessage::SummariesAck { seq: last });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%node, error = %format!("{e:#}"), "cannot store offline summaries (the node keeps them)");
                    }
                }
            }
            ControlMessage::Event(ev) => {
                let id = node.clone();
                let kind = format!("node.{}", ev.kind);
                if let Err(e) =
                    fleet.db(move |r| r.event(Some(&id), &kind, &ev.message, ev.at_ms)).await
                {
                    tracing::warn!(%node, error = %format!("{e:#}"), "cannot record a node event");
                }
            }
            ControlMessage::Update(u) => {
                let id = node.clone();
                let (kind, message) = crate::updates::event_of(&u);
                let at = u.at_ms;
                if let Err(e) = fleet.db(move |r| r.event(Some(&id), &kind, &message, at)).await {
                    tracing::warn!(%node, error = %format!("{e:#}"), "cannot record an update report");
                }
                crate::rollout::on_report(&fleet, &node, &u).await;
            }
            other => {
                tracing::info!(%node, message = kind(&other), "unexpected message from a node: closing");
                break;
            }
        }
    }
    {
        let mut live = fleet.live();
        if let Some(l) = live.get_mut(&node)
            && l.session == session
        {
            l.tx = None;
        }
    }
    writer_task.abort();
    tracing::info!(%node, "session closed");
}

/// Write and flush the encoded messages in `out` (if any) and empty it.
async fn flush_out<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    w.write_all(out).await?;
    w.flush().await?;
    out.clear();
    Ok(())
}

/// The command stream of one session: sends the node's unacknowledged commands above
/// `last_sent` in id order.
struct Commands {
    fleet: Arc<Fleet>,
    node: String,
    last_sent: u64,
}

impl Commands {
    async fn send_unacked<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<(), ()> {
        let (id, after) = (self.node.clone(), self.last_sent);
        let pending = match self.fleet.db(move |r| r.unacked_commands(&id, after)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(node = %self.node, error = %format!("{e:#}"), "cannot read queued commands");
                return Ok(());
            }
        };
        for (cid, kind) in pending {
            write_message(w, &ControlMessage::Command(Command { id: cid, kind }))
                .await
                .map_err(|_| ())?;
            self.last_sent = cid;
            if let Err(e) = self.fleet.db(move |r| r.command_sent(cid)).await {
                tracing::warn!(node = %self.node, error = %format!("{e:#}"), "cannot mark a command sent");
            }
        }
        Ok(())
    }
}

fn kind(m: &ControlMessage) -> &'static str {
    match m {
        ControlMessage::Hello(_) => "Hello",
        ControlMessage::Welcome(_) => "Welcome",
        ControlMessage::Refused(_) => "Refused",
        ControlMessage::Heartbeat(_) => "Heartbeat",
        ControlMessage::HeartbeatAck { .. } => "HeartbeatAck",
        ControlMessage::Desired(_) => "Desired",
        ControlMessage::Command(_) => "Command",
        ControlMessage::CommandAck(_) => "CommandAck",
        ControlMessage::Event(_) => "Event",
        ControlMessage::Summaries(_) => "Summaries",
        ControlMessage::SummariesAck { .. } => "SummariesAck",
        ControlMessage::Update(_) => "Update",
    }
}
