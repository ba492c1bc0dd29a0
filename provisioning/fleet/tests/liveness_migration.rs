//! The migration that moves per-heartbeat liveness out of `nodes` into the narrow
//! `node_liveness` table (`docs/fleet-scaling.md`): a registry at the schema before it, with a node
//! that was seen (last seen, heartbeat, protocol version, gateway) and one never seen, keeps all
//! of that through the migration; the old columns are gone from `nodes`; the node never seen gets
//! a row that the next liveness batch updates; a gateway still finds its nodes' notifications.
//! On SQLite and on PostgreSQL.

mod common;

use common::{Db, TestResult, registry_url};
use hearth_fleet::registry::postgres::Postgres;
use hearth_fleet::registry::sqlite::Sqlite;
use hearth_fleet::registry::{Backend, MIGRATIONS, Registry, Seen, Value};
use hearth_proto::api::NodeState;
use hearth_proto::control::{DesiredState, HealthSummary, Heartbeat, PowerSummary, Versions};
use hearth_proto::fleet::HardwareIdentity;

fn heartbeat(draw_w: u32) -> Heartbeat {
    Heartbeat {
        seq: 3,
        at_ms: 1,
        state: NodeState::Ready,
        health: HealthSummary { gpus: 8, healthy: 8, degraded: 0, failed: 0 },
        power: PowerSummary { draw_w, limit_w: 5600 },
        versions: Versions { agent: "0.1.0".into(), driver: None, os: None },
        desired_generation: 1,
    }
}

fn t(s: &str) -> Value {
    Value::Text(Some(s.to_string()))
}

fn backend(
    db: Db,
    url: &str,
) -> Result<Box<dyn Backend>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(match db {
        Db::Sqlite => Box::new(Sqlite::open(std::path::Path::new(
            url.strip_prefix("sqlite:").ok_or("not a sqlite url")?,
        ))?),
        Db::Postgres => Box::new(Postgres::connect(url)?),
    })
}

/// The schema as it was before the liveness migration, with two nodes and a notification.
fn old_registry(db: Db, url: &str) -> TestResult {
    let before = MIGRATIONS
        .iter()
        .position(|m| m.contains("CREATE TABLE node_liveness"))
        .ok_or("no liveness migration")?;
    let b = backend(db, url)?;
    let serial = b.serial_pk();
    let hb = serde_json::to_string(&heartbeat(4321))?;
    let hardware = serde_json::to_string(&HardwareIdentity {
        dmi_uuid: "u".into(),
        board_serial: "serial".into(),
        gpu_uuids: vec![],
    })?;
    let desired = serde_json::to_string(&DesiredState {
        generation: 1,
        drain: false,
        power_budget_w: None,
        labels: Default::default(),
        update_channel: "stable".into(),
        update_version: None,
    })?;
    b.transact(&mut |tx| {
        tx.exec(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
            &[],
        )?;
        for (n, m) in MIGRATIONS[..before].iter().enumerate() {
            for stmt in m.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                tx.exec(&stmt.replace("{serial}", serial), &[])?;
            }
            tx.exec(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, 0)",
                &[Value::Int(Some(n as i64 + 1))],
            )?;
        }
        let node = "INSERT INTO nodes (id, token_id, dmi_uuid, board_serial, hardware, hostname,
            gpus, agent_version, enrolled_ms, cert_serial, cert_not_after_ms, desired, revoked,
            last_seen_ms, heartbeat, protocol_version, gateway)
            VALUES ($1, 'tok', $2, 'serial', $3, $4, '[]', '0.1.0', 10, 'ab', 99, $5, 0, $6, $7, $8, $9)";
        tx.exec(
            node,
            &[
                t("n-seen"),
                t("uuid-seen"),
                t(&hardware),
                t("seen"),
                t(&desired),
                Value::Int(Some(1234)),
                t(&hb),
                Value::Int(Some(2)),
                t("g1"),
            ],
        )?;
        tx.exec(
            node,
            &[
                t("n-never"),
                t("uuid-never"),
                t(&hardware),
                t("never"),
                t(&desired),
                Value::Int(None),
                Value::Text(None),
                Value::Int(None),
                Value::Text(None),
            ],
        )?;
        tx.exec("INSERT INTO outbox (node_id, created_ms) VALUES ('n-seen', 50)", &[])?;
        Ok(())
    })?;
    Ok(())
}

fn migrates(db: Db) -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(url) = registry_url(db, dir.path()) else { return Ok(()) };
    old_registry(db, &url)?;

    let reg = Registry::open_url(&url)?;
    let seen = reg.node("n-seen")?.ok_or("n-seen is gone")?;
    assert_eq!(seen.last_seen_ms, Some(1234));
    assert_eq!(seen.heartbeat.map(|h| h.power.draw_w), Some(4321));
    assert_eq!(seen.protocol_version, Some(2));
    assert_eq!(seen.hostname, "seen");
    let never = reg.node("n-never")?.ok_or("n-never is gone")?;
    assert_eq!((never.last_seen_ms, never.heartbeat, never.protocol_version), (None, None, None));
    assert_eq!(reg.nodes()?.len(), 2);
    let dump = reg.dump()?;
    assert_eq!(dump["node_liveness"].len(), 2, "one liveness row per node: {dump:?}");
    // The gateway column moved with the rest: g1 still gets its node's notification.
    assert_eq!(reg.take_notifications("g1", 0)?, vec!["n-seen".to_string()]);

    // The wide row no longer carries the liveness columns.
    let b = backend(db, &url)?;
    for column in ["last_seen_ms", "heartbeat", "protocol_version", "gateway"] {
        let r = b.transact(&mut |tx| {
            tx.query(&format!("SELECT {column} FROM nodes"), &[])?;
            Ok(())
        });
        assert!(r.is_err(), "nodes.{column} is still there");
    }
    drop(b);

    // A node never seen before the migration has a row the next batch updates.
    reg.record_seen(&[Seen {
        node_id: "n-never".into(),
        last_seen_ms: 5678,
        heartbeat: Some(heartbeat(99)),
        protocol_version: 1,
        gateway: Some("g2".into()),
    }])?;
    let never = reg.node("n-never")?.ok_or("n-never is gone")?;
    assert_eq!(never.last_seen_ms, Some(5678));
    assert_eq!(never.heartbeat.map(|h| h.power.draw_w), Some(99));
    assert_eq!(reg.node("n-seen")?.and_then(|n| n.last_seen_ms), Some(1234), "untouched");

    // Every migration is recorded on both backends, the PostgreSQL-only one included; on
    // PostgreSQL the liveness table leaves room on its pages for HOT updates.
    let dump = reg.dump()?;
    assert_eq!(
        dump["schema_migrations"].len(),
        MIGRATIONS.len(),
        "{:?}",
        dump["schema_migrations"]
    );
    if db == Db::Postgres {
        let b = backend(db, &url)?;
        let mut options = String::new();
        b.transact(&mut |tx| {
            let rows = tx.query(
                "SELECT COALESCE(array_to_string(reloptions, ','), '') FROM pg_class \
                 WHERE relname = 'node_liveness'",
                &[],
            )?;
            options =
                rows.first().and_then(|r| r.first()).map(|v| format!("{v:?}")).unwrap_or_default();
            Ok(())
        })?;
        assert!(options.contains("fillfactor=70"), "node_liveness options: {options}");
    }

    // Opening again finds nothing left to migrate and changes nothing.
    drop(reg);
    assert_eq!(Registry::open_url(&url)?.dump()?, dump);
    Ok(())
}

#[test]
fn liveness_migration_on_sqlite() -> TestResult {
    migrates(Db::Sqlite)
}

#[test]
fn liveness_migration_on_postgres() -> TestResult {
    migrates(Db::Postgres)
}
