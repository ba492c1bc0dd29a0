//! The fleet side of a node's `hearth/1` control session.
//!
//! Hello → (version check, node not revoked) → Welcome, the current desired state and any queued
//! commands; then heartbeats (acked at once, kept in memory, written to the registry in batches by
//! the sweep task) and command acks. A node silent for 3 heartbeat intervals is shown offline; a
//! newer session of the same node replaces the older one.

use std::sync::Arc;
use std::time::Duration;

use hearth_fleet_client::session::{read_message, write_message};
use hearth_proto::control::{
    self, Command, ControlMessage, HEARTBEAT_INTERVAL_S, Refusal, Welcome,
};
use tokio::io::{AsyncRead, AsyncWrite};
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
    let id = node.clone();
    let pending = fleet.db(move |r| r.pending_commands(&id)).await.unwrap_or_default();

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
    let _ = tx.try_send(welcome);
    let _ = tx.try_send(ControlMessage::Desired(row.desired.clone()));
    for (cid, kind) in pending {
        if tx.try_send(ControlMessage::Command(Command { id: cid, kind })).is_ok() {
            let _ = fleet.db(move |r| r.command_sent(cid)).await;
        }
    }
    drop(tx);

    let writer_task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_message(&mut writer, &msg).await.is_err() {
                break;
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
                if let Err(e) =
                    fleet.db(move |r| r.event(Some(&id), &kind, &message, u.at_ms)).await
                {
                    tracing::warn!(%node, error = %format!("{e:#}"), "cannot record an update report");
                }
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
