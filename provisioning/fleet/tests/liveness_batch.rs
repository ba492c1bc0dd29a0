//! Liveness batches (`Registry::record_seen`): one statement per node on SQLite, one per chunk
//! of nodes on PostgreSQL; across chunk boundaries, unknown ids ignored, nodes outside the batch
//! untouched; on SQLite and on PostgreSQL.

mod common;

use common::{Db, TestResult, enroll_request, fleet_on};
use hearth_fleet::registry::{SEEN_CHUNK, Seen};
use hearth_fleet_client::enroll::enroll;
use hearth_proto::api::NodeState;
use hearth_proto::control::{HealthSummary, Heartbeat, PowerSummary, Versions};

fn heartbeat(draw_w: u32) -> Heartbeat {
    Heartbeat {
        seq: 7,
        at_ms: 1,
        state: NodeState::Ready,
        health: HealthSummary { gpus: 8, healthy: 8, degraded: 0, failed: 0 },
        power: PowerSummary { draw_w, limit_w: 5600 },
        versions: Versions { agent: "0.1.0".into(), driver: None, os: None },
        desired_generation: 1,
    }
}

async fn batches_cross_chunks(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let token = f.token(4, 600).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        let (req, _key) = enroll_request(&token.token, 100 + n);
        ids.push(enroll(&f.ep(), &f.pin(), &req).await?.node_id);
    }
    // Three real nodes at the start, on a chunk boundary and at the end of a 2-chunk-plus batch;
    // the fourth stays out of it.
    let len = 2 * SEEN_CHUNK + 1;
    let mut batch: Vec<Seen> = (0..len)
        .map(|k| Seen {
            node_id: format!("n-unknown{k}"),
            last_seen_ms: 1,
            heartbeat: None,
            protocol_version: 1,
            gateway: None,
        })
        .collect();
    for (slot, (pos, id)) in [0, SEEN_CHUNK, len - 1].into_iter().zip(&ids).enumerate() {
        batch[pos] = Seen {
            node_id: id.clone(),
            last_seen_ms: 1_000 + slot as u64,
            heartbeat: Some(heartbeat(4000 + slot as u32)),
            protocol_version: 1,
            gateway: Some("g1".into()),
        };
    }
    // Registry calls run on blocking threads (the PostgreSQL client blocks on its own runtime).
    let fleet = f.running.fleet.clone();
    let dump = || {
        let reg = fleet.registry.clone();
        async move { tokio::task::spawn_blocking(move || reg.dump()).await }
    };
    let node = |id: String| fleet.db(move |r| r.node(&id));
    let before = dump().await??;
    fleet.db(move |r| r.record_seen(&batch)).await?;
    for (slot, id) in ids.iter().take(3).enumerate() {
        let row = node(id.clone()).await?.ok_or("node row")?;
        assert_eq!(row.last_seen_ms, Some(1_000 + slot as u64), "{id}");
        assert_eq!(row.heartbeat.map(|h| h.power.draw_w), Some(4000 + slot as u32), "{id}");
        assert_eq!(row.protocol_version, Some(1));
    }
    let untouched = node(ids[3].clone()).await?.ok_or("node row")?;
    assert_eq!(untouched.last_seen_ms, None, "a node outside the batch is untouched");
    let after = dump().await??;
    assert_eq!(before["tokens"], after["tokens"]);
    assert_eq!(before["events"], after["events"]);
    assert_eq!(before["nodes"].len(), after["nodes"].len(), "unknown ids add no rows");
    f.running.stop().await;
    // The last handle on the registry goes on a blocking thread too.
    tokio::task::spawn_blocking(move || drop(fleet)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_batch_on_sqlite() -> TestResult {
    batches_cross_chunks(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_batch_on_postgres() -> TestResult {
    batches_cross_chunks(Db::Postgres).await
}
