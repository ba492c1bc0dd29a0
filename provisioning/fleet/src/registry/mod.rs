//! The node registry: tokens, nodes, commands and events in one SQL schema with migrations, on
//! SQLite (embedded default, WAL) or PostgreSQL behind one [`Backend`] trait.
//!
//! All logic is written once against [`Tx`] (parameters `$1…`, portable SQL); a backend only runs
//! statements inside a transaction. Every change is one transaction, so a refused request changes
//! nothing: the bad-input tests compare [`Registry::dump`] before and after. Enrollment consumes a
//! token with a conditional `UPDATE … WHERE uses < max_uses`, so two enrollments racing on a
//! single-use token cannot both win on either backend. Design: `docs/0005-fleet.md`.

pub mod expose;
pub mod postgres;
pub mod rollouts;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fmt;

use hearth_proto::control::{CommandKind, CommandOutcome, DesiredState, Heartbeat};
use hearth_proto::fleet::{CommandView, EventView, HardwareIdentity, NodeView, TokenView};
use hearth_proto::gpu::GpuInventory;

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    /// An integer (BIGINT).
    Int(Option<i64>),
    /// Text.
    Text(Option<String>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(Some(i)) => write!(f, "{i}"),
            Value::Text(Some(s)) => write!(f, "{s:?}"),
            Value::Int(None) | Value::Text(None) => write!(f, "NULL"),
        }
    }
}

fn int(i: impl TryInto<i64>) -> Value {
    Value::Int(Some(i.try_into().unwrap_or(i64::MAX)))
}
fn text(s: impl Into<String>) -> Value {
    Value::Text(Some(s.into()))
}

/// A database failure (not a refusal).
#[derive(Debug, thiserror::Error)]
#[error("{backend} registry: {what}")]
pub struct DbError {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The statement or step.
    pub what: String,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Why an enrollment is refused. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token has that secret.
    #[error("unknown enrollment token")]
    UnknownToken,
    /// The token expired.
    #[error("enrollment token {id} expired")]
    ExpiredToken {
        /// Token id.
        id: String,
    },
    /// An operator revoked it.
    #[error("enrollment token {id} was revoked")]
    RevokedToken {
        /// Token id.
        id: String,
    },
    /// All its uses are spent.
    #[error("enrollment token {id} is used up ({max_uses} use(s))")]
    UsedUpToken {
        /// Token id.
        id: String,
        /// Its uses.
        max_uses: u32,
    },
    /// The hardware belongs to a revoked node.
    #[error("this hardware is node {node}, which was revoked")]
    RevokedHardware {
        /// Node id.
        node: String,
    },
    /// No such node (or it is revoked).
    #[error("node {node} is unknown or revoked")]
    UnknownNode {
        /// Node id.
        node: String,
    },
    /// No such token.
    #[error("no token {id}")]
    NoSuchToken {
        /// Token id.
        id: String,
    },
    /// Signing failed.
    #[error("cannot issue the certificate: {0}")]
    Signing(String),
    /// A rollout request or change is refused (`crate::rollout`).
    #[error(transparent)]
    Rollout(#[from] crate::rollout::RolloutError),
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Refused: the request is wrong, nothing changed.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stored JSON column could not be read.
    #[error("registry column {column} of {id} is corrupt")]
    Corrupt {
        /// Column.
        column: &'static str,
        /// Row id.
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Statements inside one transaction.
pub trait Tx {
    /// Run a statement; the number of rows changed.
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    /// Run a query; its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, DbError>;
}

/// A database: SQLite or PostgreSQL.
pub trait Backend: Send + Sync + fmt::Debug {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// The column type of an auto-increment primary key.
    fn serial_pk(&self) -> &'static str;
    /// Run `f`, which only reads, in one transaction (by default the same as [`Backend::transact`]).
    fn read(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        self.transact(f)
    }
    /// Run `f` in one transaction: committed if it returns `Ok`, rolled back otherwise.
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError>;
}

/// The schema, one migration per entry; `{serial}` becomes the backend's auto-increment key, and
/// a statement that starts with `{postgres}` runs on PostgreSQL only (SQLite records the
/// migration as applied).
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE tokens (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, labels TEXT NOT NULL,
        created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL, max_uses BIGINT NOT NULL,
        uses BIGINT NOT NULL, revoked BIGINT NOT NULL);
     CREATE TABLE nodes (id TEXT PRIMARY KEY, token_id TEXT NOT NULL, dmi_uuid TEXT NOT NULL,
        board_serial TEXT NOT NULL, hardware TEXT NOT NULL, hostname TEXT NOT NULL,
        gpus TEXT NOT NULL, agent_version TEXT NOT NULL, enrolled_ms BIGINT NOT NULL,
        cert_serial TEXT NOT NULL, cert_not_after_ms BIGINT NOT NULL, desired TEXT NOT NULL,
        revoked BIGINT NOT NULL, last_seen_ms BIGINT, heartbeat TEXT, protocol_version BIGINT);
     CREATE UNIQUE INDEX nodes_hardware ON nodes (dmi_uuid, board_serial);
     CREATE TABLE commands (id {serial}, node_id TEXT NOT NULL, kind TEXT NOT NULL,
        created_ms BIGINT NOT NULL, sent BIGINT NOT NULL, outcome TEXT);
     CREATE TABLE events (id {serial}, at_ms BIGINT NOT NULL, node_id TEXT, kind TEXT NOT NULL,
        message TEXT NOT NULL)",
    "ALTER TABLE nodes ADD COLUMN gateway TEXT;
     CREATE TABLE outbox (id {serial}, node_id TEXT NOT NULL, created_ms BIGINT NOT NULL)",
    // Offline summaries uploaded on reconnect (docs/0007-telemetry.md); (node, seq) is unique so
    // a re-sent batch (an ack lost with the connection) is stored once.
    "CREATE TABLE node_summaries (node_id TEXT NOT NULL, seq BIGINT NOT NULL,
        start_ms BIGINT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (node_id, seq))",
    // Staged rollouts (docs/0009-updates.md): one JSON document per rollout with a generation.
    "CREATE TABLE rollouts (id {serial}, channel TEXT NOT NULL, version TEXT NOT NULL,
        state TEXT NOT NULL, generation BIGINT NOT NULL, body TEXT NOT NULL,
        created_ms BIGINT NOT NULL)",
    // Gateway ports forwarding to a port on a node (`hearthctl expose`, registry/expose.rs).
    "CREATE TABLE exposures (gateway_port BIGINT PRIMARY KEY, node_id TEXT NOT NULL,
        node_port BIGINT NOT NULL, created_by TEXT NOT NULL, created_ms BIGINT NOT NULL,
        UNIQUE (node_id, node_port))",
    // Per-heartbeat liveness in its own narrow table (docs/fleet-scaling.md): a liveness batch
    // rewrites this ≈ 0.3 KB row per node instead of the ≈ 2 KB `nodes` row with its hardware and
    // GPU JSON. One row per node, made at enrollment (and here for the nodes already enrolled),
    // so `record_seen` stays an `UPDATE` by primary key.
    "CREATE TABLE node_liveness (node_id TEXT PRIMARY KEY, last_seen_ms BIGINT,
        heartbeat TEXT, protocol_version BIGINT, gateway TEXT);
     INSERT INTO node_liveness (node_id, last_seen_ms, heartbeat, protocol_version, gateway)
        SELECT id, last_seen_ms, heartbeat, protocol_version, gateway FROM nodes;
     ALTER TABLE nodes DROP COLUMN last_seen_ms;
     ALTER TABLE nodes DROP COLUMN heartbeat;
     ALTER TABLE nodes DROP COLUMN protocol_version;
     ALTER TABLE nodes DROP COLUMN gateway",
    // Room on each `node_liveness` page for the next version of its rows: every liveness batch
    // rewrites every live node's row, and with pages packed full (fill factor 100) no update
    // could stay on its page, so each one also wrote the primary-key index and the table grew
    // to 3.7× its live size. At 70 nearly all are HOT updates (`bench/liveness-pg`: server CPU
    // per row −23 %, docs/fleet-scaling.md). PostgreSQL only (`{postgres}`); pages already
    // written fill to it as vacuum frees them.
    "{postgres}ALTER TABLE node_liveness SET (fillfactor = 70)",
    // The desired state's update channel in its own indexed column, so that a rollout's tick
    // reads only its channel's nodes instead of parsing every node's desired JSON
    // (registry/rollouts.rs). Written with `desired` in one statement. Every node enrolled
    // before this migration is on `stable`: nothing could change a node's channel before
    // `POST /v1/nodes/{id}/channel`, which came with it. A token names the channel its new
    // nodes get (`hearthctl tokens create --channel`); every older token gave `stable`.
    "ALTER TABLE nodes ADD COLUMN update_channel TEXT NOT NULL DEFAULT 'stable';
     CREATE INDEX nodes_update_channel ON nodes (update_channel);
     ALTER TABLE tokens ADD COLUMN update_channel TEXT NOT NULL DEFAULT 'stable'",
];

/// Tables [`Registry::dump`] covers: every table.
pub const TABLES: &[&str] = &[
    "schema_migrations",
    "tokens",
    "nodes",
    "commands",
    "events",
    "outbox",
    "node_summaries",
    "rollouts",
    "exposures",
    "node_liveness",
];

/// A token to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// Public id.
    pub id: String,
    /// SHA-256 (hex) of the secret.
    pub hash: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation.
    pub created_ms: u64,
    /// Expiry.
    pub expires_ms: u64,
    /// Allowed uses.
    pub max_uses: u32,
    /// The update channel of the nodes that enroll with it.
    pub update_channel: String,
}

/// What an enrollment writes about the node.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// SHA-256 (hex) of the token secret.
    pub token_hash: String,
    /// Hardware identity.
    pub hardware: HardwareIdentity,
    /// Host name.
    pub hostname: String,
    /// GPUs.
    pub gpus: Vec<GpuInventory>,
    /// Agent version.
    pub agent_version: String,
    /// A fresh id to use if the hardware is new.
    pub new_id: String,
}

/// A certificate the registry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    /// Serial (hex).
    pub serial: String,
    /// Expiry, ms since the Unix epoch.
    pub not_after_ms: u64,
}

/// Issues the certificate for a node id inside an enrollment's transaction.
pub type SignFn<'a> = dyn FnMut(&str) -> Result<CertRecord, String> + Send + 'a;

/// One enrollment of a batch ([`Registry::enroll_batch`]) and its signer.
pub type BatchItem<'a> = (&'a Enrollment, &'a mut SignFn<'a>);

/// An enrollment's outcome: the node id and whether it is new, or why not.
pub type EnrollOutcome = Result<(String, bool), RegistryError>;

/// An event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The node it is about.
    pub node: Option<String>,
    /// Kind (`online`, `offline`, …).
    pub kind: String,
    /// Text.
    pub message: String,
}

/// A live node's latest state, flushed in batches.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Node id.
    pub node_id: String,
    /// Last heartbeat time.
    pub last_seen_ms: u64,
    /// Its content.
    pub heartbeat: Option<Heartbeat>,
    /// Session protocol version.
    pub protocol_version: u16,
    /// The gateway (fleet process) holding its session, when the fleet runs several.
    pub gateway: Option<String>,
}

/// Nodes per PostgreSQL statement in [`Registry::record_seen`] (one JSON parameter of about
/// 300 bytes per node).
pub const SEEN_CHUNK: usize = 5000;

/// One node of a liveness batch as PostgreSQL's `json_to_recordset` reads it.
#[derive(serde::Serialize)]
struct SeenRow<'a> {
    id: &'a str,
    seen: u64,
    hb: Option<&'a Heartbeat>,
    pv: u16,
    gw: Option<&'a str>,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    backend: Box<dyn Backend>,
}

fn s(v: &Value) -> String {
    match v {
        Value::Text(Some(s)) => s.clone(),
        Value::Int(Some(i)) => i.to_string(),
        _ => String::new(),
    }
}
fn os(v: &Value) -> Option<String> {
    match v {
        Value::Text(Some(s)) => Some(s.clone()),
        _ => None,
    }
}
fn i(v: &Value) -> i64 {
    match v {
        Value::Int(Some(i)) => *i,
        _ => 0,
    }
}
fn oi(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => *i,
        _ => None,
    }
}
fn col(row: &[Value], n: usize) -> &Value {
    row.get(n).unwrap_or(&Value::Int(None))
}
fn json<T: serde::de::DeserializeOwned>(
    v: &Value,
    column: &'static str,
    id: &str,
) -> Result<T, RegistryError> {
    serde_json::from_str(&s(v)).map_err(|source| RegistryError::Corrupt {
        column,
        id: id.to_string(),
        source,
    })
}
fn to_json<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_string(t).unwrap_or_default()
}

fn add_event(
    tx: &mut dyn Tx,
    at_ms: u64,
    node: Option<&str>,
    kind: &str,
    message: &str,
) -> Result<(), DbError> {
    tx.exec(
        "INSERT INTO events (at_ms, node_id, kind, message) VALUES ($1, $2, $3, $4)",
        &[int(at_ms), Value::Text(node.map(str::to_string)), text(kind), text(message)],
    )?;
    Ok(())
}

/// A node row joined with its liveness row (`node_liveness`, written by [`Registry::record_seen`]).
const NODE_COLUMNS: &str = "n.id, n.hostname, n.hardware, n.gpus, n.enrolled_ms, n.cert_not_after_ms, n.desired, n.revoked, l.last_seen_ms, l.heartbeat, l.protocol_version";

/// The tables [`NODE_COLUMNS`] reads (a node enrolled before its liveness row existed still
/// shows, with no liveness).
const NODE_FROM: &str = "nodes n LEFT JOIN node_liveness l ON l.node_id = n.id";

/// A node row as stored (without liveness, which the server adds).
fn node_from_row(row: &[Value]) -> Result<NodeView, RegistryError> {
    let id = s(col(row, 0));
    let desired: DesiredState = json(col(row, 6), "desired", &id)?;
    let heartbeat = match os(col(row, 9)) {
        Some(t) => Some(serde_json::from_str(&t).map_err(|source| RegistryError::Corrupt {
            column: "heartbeat",
            id: id.clone(),
            source,
        })?),
        None => None,
    };
    Ok(NodeView {
        hostname: s(col(row, 1)),
        hardware: json(col(row, 2), "hardware", &id)?,
        gpus: json(col(row, 3), "gpus", &id)?,
        labels: desired.labels.clone(),
        online: false,
        last_seen_ms: oi(col(row, 8)).map(|v| v as u64),
        enrolled_ms: i(col(row, 4)) as u64,
        cert_not_after_ms: i(col(row, 5)) as u64,
        heartbeat,
        protocol_version: oi(col(row, 10)).map(|v| v as u16),
        desired,
        revoked: i(col(row, 7)) != 0,
        id,
    })
}

impl Registry {
    /// Open a registry on `backend` and bring its schema up to date.
    pub fn open(backend: Box<dyn Backend>) -> Result<Self, RegistryError> {
        let reg = Self { backend };
        reg.migrate()?;
        Ok(reg)
    }

    /// Open from a URL: `sqlite:PATH` (or a bare path) or `postgres://…`.
    pub fn open_url(url: &str) -> Result<Self, RegistryError> {
        let backend: Box<dyn Backend> =
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Box::new(postgres::Postgres::connect(url)?)
            } else {
                let path = url
                    .strip_prefix("sqlite://")
                    .or_else(|| url.strip_prefix("sqlite:"))
                    .unwrap_or(url);
                Box::new(sqlite::Sqlite::open(std::path::Path::new(path))?)
            };
        Self::open(backend)
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// A read-only transaction (on SQLite it takes no write lock, so readers in several fleet
    /// processes never wait for each other).
    fn rtx<R>(
        &self,
        f: impl FnMut(&mut dyn Tx) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        self.run(true, f)
    }

    fn tx<R>(
        &self,
        f: impl FnMut(&mut dyn Tx) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        self.run(false, f)
    }

    /// Run `f` in one transaction (read-only when `read`) and return what it returned.
    fn run<R>(
        &self,
        read: bool,
        mut f: impl FnMut(&mut dyn Tx) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        let mut out = None;
        let mut body = |tx: &mut dyn Tx| {
            out = Some(f(tx)?);
            Ok(())
        };
        if read { self.backend.read(&mut body) } else { self.backend.transact(&mut body) }?;
        out.ok_or_else(|| {
            RegistryError::Db(DbError {
                backend: self.backend.kind(),
                what: "transaction returned nothing".into(),
                source: "no result".into(),
            })
        })
    }

    fn migrate(&self) -> Result<(), RegistryError> {
        let serial = self.backend.serial_pk();
        let postgres = self.backend.kind() == "postgres";
        self.tx(|tx| {
            if postgres {
                // Several fleet processes (gateways) may start at once on one database: one
                // migrates, the others wait here and then find nothing left to do.
                tx.exec("SELECT pg_advisory_xact_lock(7443)", &[])?;
            }
            tx.exec(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                &[],
            )?;
            let rows = tx.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])?;
            let current = rows.first().map_or(0, |r| i(col(r, 0))) as usize;
            for (n, m) in MIGRATIONS.iter().enumerate().skip(current) {
                for stmt in m.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    let stmt = match stmt.strip_prefix("{postgres}") {
                        Some(_) if !postgres => continue,
                        Some(pg) => pg,
                        None => stmt,
                    };
                    tx.exec(&stmt.replace("{serial}", serial), &[])?;
                }
                tx.exec(
                    "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                    &[int(n as i64 + 1), int(crate::now_ms())],
                )?;
                tracing::info!(version = n + 1, backend = self.kind(), "registry migrated");
            }
            Ok(())
        })
    }

    /// Every row of every table, as text, in key order (what the bad-input tests compare).
    pub fn dump(&self) -> Result<BTreeMap<String, Vec<String>>, RegistryError> {
        self.rtx(|tx| {
            let mut out = BTreeMap::new();
            for t in TABLES {
                let rows = tx.query(&format!("SELECT * FROM {t} ORDER BY 1"), &[])?;
                let rows = rows
                    .iter()
                    .map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>().join(" | "))
                    .collect();
                out.insert((*t).to_string(), rows);
            }
            Ok(out)
        })
    }

    /// Store a new token.
    pub fn create_token(&self, t: &NewToken) -> Result<(), RegistryError> {
        self.tx(|tx| {
            tx.exec(
                "INSERT INTO tokens (id, hash, labels, created_ms, expires_ms, max_uses, uses, revoked,
                    update_channel) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7)",
                &[
                    text(&t.id),
                    text(&t.hash),
                    text(to_json(&t.labels)),
                    int(t.created_ms),
                    int(t.expires_ms),
                    int(t.max_uses),
                    text(&t.update_channel),
                ],
            )?;
            add_event(
                tx,
                t.created_ms,
                None,
                "token-created",
                &format!("token {} ({} use(s), channel {})", t.id, t.max_uses, t.update_channel),
            )?;
            Ok(())
        })
    }

    /// All tokens, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenView>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query(
                "SELECT id, labels, created_ms, expires_ms, max_uses, uses, revoked, update_channel \
                 FROM tokens ORDER BY created_ms, id",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    let id = s(col(r, 0));
                    Ok(TokenView {
                        labels: json(col(r, 1), "labels", &id)?,
                        created_ms: i(col(r, 2)) as u64,
                        expires_ms: i(col(r, 3)) as u64,
                        max_uses: i(col(r, 4)) as u32,
                        uses: i(col(r, 5)) as u32,
                        revoked: i(col(r, 6)) != 0,
                        channel: s(col(r, 7)),
                        id,
                    })
                })
                .collect()
        })
    }

    /// Revoke a token.
    pub fn revoke_token(&self, id: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.tx(|tx| {
            if tx.exec("UPDATE tokens SET revoked = 1 WHERE id = $1", &[text(id)])? == 0 {
                return Err(Refusal::NoSuchToken { id: id.to_string() }.into());
            }
            add_event(tx, now_ms, None, "token-revoked", &format!("token {id}"))?;
            Ok(())
        })
    }

    /// Enroll: check and consume the token, then create the node (or re-enroll known hardware,
    /// keeping its id) with the certificate `sign(node_id)` issues, all in one transaction.
    pub fn enroll(
        &self,
        e: &Enrollment,
        now_ms: u64,
        sign: &mut dyn FnMut(&str) -> Result<CertRecord, String>,
    ) -> Result<(String, bool), RegistryError> {
        let postgres = self.backend.kind() == "postgres";
        self.tx(|tx| enroll_in(tx, postgres, e, now_ms, sign))
    }

    /// Several enrollments in one transaction (one durable commit for all: group commit). A
    /// refused one writes nothing (its checks come before its writes, and a use of the token it
    /// took is given back), so the others still commit. The result of each, in order; a database
    /// error or a failed commit fails them all.
    pub fn enroll_batch(
        &self,
        batch: &mut [BatchItem<'_>],
        now_ms: u64,
    ) -> Result<Vec<EnrollOutcome>, RegistryError> {
        let postgres = self.backend.kind() == "postgres";
        self.tx(|tx| {
            let mut out = Vec::with_capacity(batch.len());
            for (e, sign) in batch.iter_mut() {
                // A refusal writes nothing (see `enroll_in`); a database error ends the batch.
                match enroll_in(tx, postgres, e, now_ms, *sign) {
                    Err(RegistryError::Refused(r)) => out.push(Err(r.into())),
                    r => out.push(Ok(r?)),
                }
            }
            Ok(out)
        })
    }

    /// Record a renewed certificate for a node that is known and not revoked.
    pub fn renew(
        &self,
        node: &str,
        now_ms: u64,
        sign: &mut dyn FnMut(&str) -> Result<CertRecord, String>,
    ) -> Result<(), RegistryError> {
        self.tx(|tx| {
            let rows = tx.query("SELECT revoked FROM nodes WHERE id = $1", &[text(node)])?;
            if rows.first().is_none_or(|r| i(col(r, 0)) != 0) {
                return Err(Refusal::UnknownNode { node: node.to_string() }.into());
            }
            let cert = sign(node).map_err(Refusal::Signing)?;
            tx.exec(
                "UPDATE nodes SET cert_serial = $2, cert_not_after_ms = $3 WHERE id = $1",
                &[text(node), text(&cert.serial), int(cert.not_after_ms)],
            )?;
            add_event(tx, now_ms, Some(node), "renewed", "certificate renewed")?;
            Ok(())
        })
    }

    /// Every node, by id.
    pub fn nodes(&self) -> Result<Vec<NodeView>, RegistryError> {
        self.rtx(|tx| {
            let rows =
                tx.query(&format!("SELECT {NODE_COLUMNS} FROM {NODE_FROM} ORDER BY n.id"), &[])?;
            rows.iter().map(|r| node_from_row(r)).collect()
        })
    }

    /// One node.
    pub fn node(&self, id: &str) -> Result<Option<NodeView>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query(
                &format!("SELECT {NODE_COLUMNS} FROM {NODE_FROM} WHERE n.id = $1"),
                &[text(id)],
            )?;
            rows.first().map(|r| node_from_row(r)).transpose()
        })
    }

    /// Change a node's desired state (its generation rises by one); the new state.
    pub fn update_desired(
        &self,
        id: &str,
        now_ms: u64,
        what: &str,
        change: &dyn Fn(&mut DesiredState),
    ) -> Result<DesiredState, RegistryError> {
        self.tx(|tx| desired_in(tx, id, now_ms, what, change))
    }

    /// Revoke a node: its certificate is refused from now on.
    pub fn revoke_node(&self, id: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.tx(|tx| {
            if tx.exec("UPDATE nodes SET revoked = 1 WHERE id = $1", &[text(id)])? == 0 {
                return Err(Refusal::UnknownNode { node: id.to_string() }.into());
            }
            add_event(tx, now_ms, Some(id), "revoked", "node revoked by an operator")?;
            Ok(())
        })
    }

    /// Whether a node exists and is not revoked.
    pub fn node_active(&self, id: &str) -> Result<bool, RegistryError> {
        self.tx(|tx| {
            let rows = tx.query("SELECT revoked FROM nodes WHERE id = $1", &[text(id)])?;
            Ok(rows.first().is_some_and(|r| i(col(r, 0)) == 0))
        })
    }

    /// Queue a command; its id.
    pub fn add_command(
        &self,
        node: &str,
        kind: CommandKind,
        now_ms: u64,
    ) -> Result<u64, RegistryError> {
        self.tx(|tx| {
            if tx.query("SELECT id FROM nodes WHERE id = $1 AND revoked = 0", &[text(node)])?.is_empty() {
                return Err(Refusal::UnknownNode { node: node.to_string() }.into());
            }
            let rows = tx.query(
                "INSERT INTO commands (node_id, kind, created_ms, sent) VALUES ($1, $2, $3, 0) RETURNING id",
                &[text(node), text(to_json(&kind)), int(now_ms)],
            )?;
            let id = rows.first().map_or(0, |r| i(col(r, 0))) as u64;
            add_event(tx, now_ms, Some(node), "command", &format!("command {id}: {kind:?}"))?;
            Ok(id)
        })
    }

    /// Commands of a node with an id above `after` that the node has not acknowledged yet (sent
    /// or not: one sent on a session that died may never have arrived), oldest first. The session
    /// sends them in this order; the node handles each id once (`docs/0006-tunnel.md`).
    pub fn unacked_commands(
        &self,
        node: &str,
        after: u64,
    ) -> Result<Vec<(u64, CommandKind)>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query(
                "SELECT id, kind FROM commands WHERE node_id = $1 AND outcome IS NULL AND id > $2 ORDER BY id",
                &[text(node), int(after)],
            )?;
            rows.iter()
                .map(|r| {
                    let id = i(col(r, 0)) as u64;
                    Ok((id, json(col(r, 1), "kind", &id.to_string())?))
                })
                .collect()
        })
    }

    /// Mark a command sent.
    pub fn command_sent(&self, id: u64) -> Result<(), RegistryError> {
        self.tx(|tx| {
            tx.exec("UPDATE commands SET sent = 1 WHERE id = $1", &[int(id)])?;
            Ok(())
        })
    }

    /// Record a node's answer to a command: the first answer counts; a repeated ack (the node
    /// answering a command resent after a reconnect) changes nothing.
    pub fn ack_command(
        &self,
        node: &str,
        id: u64,
        outcome: &CommandOutcome,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        self.tx(|tx| {
            let n = tx.exec(
                "UPDATE commands SET outcome = $3 WHERE id = $1 AND node_id = $2 AND outcome IS NULL",
                &[int(id), text(node), text(to_json(outcome))],
            )?;
            if n > 0 {
                add_event(
                    tx,
                    now_ms,
                    Some(node),
                    "command-ack",
                    &format!("command {id}: {outcome:?}"),
                )?;
            }
            Ok(())
        })
    }

    /// Commands, newest first (of one node if given).
    pub fn commands(&self, node: Option<&str>) -> Result<Vec<CommandView>, RegistryError> {
        self.rtx(|tx| {
            let rows = match node {
                Some(n) => tx.query(
                    "SELECT id, node_id, kind, created_ms, sent, outcome FROM commands WHERE node_id = $1 ORDER BY id DESC",
                    &[text(n)],
                )?,
                None => tx.query("SELECT id, node_id, kind, created_ms, sent, outcome FROM commands ORDER BY id DESC", &[])?,
            };
            rows.iter()
                .map(|r| {
                    let id = i(col(r, 0)) as u64;
                    let outcome = match os(col(r, 5)) {
                        Some(t) => Some(serde_json::from_str(&t).map_err(|source| RegistryError::Corrupt {
                            column: "outcome",
                            id: id.to_string(),
                            source,
                        })?),
                        None => None,
                    };
                    Ok(CommandView {
                        id,
                        node_id: s(col(r, 1)),
                        kind: json(col(r, 2), "kind", &id.to_string())?,
                        created_ms: i(col(r, 3)) as u64,
                        sent: i(col(r, 4)) != 0,
                        outcome,
                    })
                })
                .collect()
        })
    }

    /// Record an event.
    pub fn event(
        &self,
        node: Option<&str>,
        kind: &str,
        message: &str,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        self.tx(|tx| Ok(add_event(tx, now_ms, node, kind, message)?))
    }

    /// Several events in one transaction (session `online`/`offline` events, written with the
    /// sweep rather than one commit per session).
    pub fn events_batch(&self, events: &[NewEvent]) -> Result<(), RegistryError> {
        if events.is_empty() {
            return Ok(());
        }
        self.tx(|tx| {
            for e in events {
                add_event(tx, e.at_ms, e.node.as_deref(), &e.kind, &e.message)?;
            }
            Ok(())
        })
    }

    /// Store a node's offline summaries (JSON bodies); one already stored is kept as it is.
    pub fn store_summaries(
        &self,
        node: &str,
        batch: &[hearth_proto::control::Summary],
    ) -> Result<(), RegistryError> {
        self.tx(|tx| {
            for sm in batch {
                let body = serde_json::to_string(sm).unwrap_or_default();
                tx.exec(
                    "INSERT INTO node_summaries (node_id, seq, start_ms, body) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (node_id, seq) DO NOTHING",
                    &[text(node), int(sm.seq), int(sm.start_ms), text(&body)],
                )?;
            }
            Ok(())
        })
    }

    /// A node's stored summaries, oldest first.
    pub fn summaries(
        &self,
        node: &str,
    ) -> Result<Vec<hearth_proto::control::Summary>, RegistryError> {
        self.tx(|tx| {
            let rows = tx.query(
                "SELECT body FROM node_summaries WHERE node_id = $1 ORDER BY seq",
                &[text(node)],
            )?;
            Ok(rows.iter().filter_map(|r| serde_json::from_str(&s(col(r, 0))).ok()).collect())
        })
    }

    /// The latest `limit` events, oldest first.
    pub fn events(&self, limit: u32) -> Result<Vec<EventView>, RegistryError> {
        self.rtx(|tx| {
            let rows = tx.query(
                "SELECT id, at_ms, node_id, kind, message FROM events ORDER BY id DESC LIMIT $1",
                &[int(limit)],
            )?;
            let mut v: Vec<EventView> = rows
                .iter()
                .map(|r| EventView {
                    id: i(col(r, 0)) as u64,
                    at_ms: i(col(r, 1)) as u64,
                    node_id: os(col(r, 2)),
                    kind: s(col(r, 3)),
                    message: s(col(r, 4)),
                })
                .collect();
            v.reverse();
            Ok(v)
        })
    }

    /// Ask the gateway holding `node`'s session (another fleet process) to send it its desired
    /// state and pending commands again, or to end it if the node was revoked.
    pub fn notify_gateway(&self, node: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.tx(|tx| {
            tx.exec(
                "INSERT INTO outbox (node_id, created_ms) VALUES ($1, $2)",
                &[text(node), int(now_ms)],
            )?;
            Ok(())
        })
    }

    /// The gateway process holding `node`'s session, as its last liveness batch recorded it
    /// (several gateway processes; `None` for a single fleet process or a node never seen).
    pub fn session_gateway(&self, node: &str) -> Result<Option<String>, RegistryError> {
        self.rtx(|tx| {
            let rows =
                tx.query("SELECT gateway FROM node_liveness WHERE node_id = $1", &[text(node)])?;
            Ok(rows.first().and_then(|r| os(col(r, 0))))
        })
    }

    /// Take the notifications for nodes whose session `gateway` holds (removed as they are
    /// returned), and drop the ones older than `expire_before_ms` (their node reconnected
    /// elsewhere or went offline; a new session gets its state at start anyway).
    pub fn take_notifications(
        &self,
        gateway: &str,
        expire_before_ms: u64,
    ) -> Result<Vec<String>, RegistryError> {
        self.tx(|tx| {
            let rows = tx.query(
                "SELECT o.id, o.node_id FROM outbox o JOIN node_liveness l ON l.node_id = o.node_id \
                 WHERE l.gateway = $1 ORDER BY o.id",
                &[text(gateway)],
            )?;
            let mut nodes = Vec::with_capacity(rows.len());
            for r in &rows {
                tx.exec("DELETE FROM outbox WHERE id = $1", &[int(i(col(r, 0)))])?;
                let n = s(col(r, 1));
                if !nodes.contains(&n) {
                    nodes.push(n);
                }
            }
            tx.exec("DELETE FROM outbox WHERE created_ms < $1", &[int(expire_before_ms)])?;
            Ok(nodes)
        })
    }

    /// Write a liveness batch in one transaction, to the narrow `node_liveness` table (one row
    /// per node, made at enrollment; the wide `nodes` row is not rewritten per heartbeat). On
    /// SQLite (in process, no round trips) one cached prepared `UPDATE … WHERE node_id = ?` per
    /// node: nothing to parse or plan per batch. On
    /// PostgreSQL one `UPDATE … FROM json_to_recordset($1)` per [`SEEN_CHUNK`] nodes: one round
    /// trip and one prepared statement with a single parameter, where the multi-row `VALUES`
    /// statement used before bound 2,500 parameters and was parsed and planned again for every
    /// 500 nodes (`docs/fleet-scaling.md`). Unknown ids change nothing.
    pub fn record_seen(&self, batch: &[Seen]) -> Result<(), RegistryError> {
        if batch.is_empty() {
            return Ok(());
        }
        let postgres = self.backend.kind() == "postgres";
        self.tx(|tx| {
            if !postgres {
                for b in batch {
                    tx.exec(
                        "UPDATE node_liveness SET last_seen_ms = $2, heartbeat = $3, \
                         protocol_version = $4, gateway = $5 WHERE node_id = $1",
                        &[
                            text(&b.node_id),
                            int(b.last_seen_ms),
                            Value::Text(b.heartbeat.as_ref().map(to_json)),
                            int(b.protocol_version),
                            Value::Text(b.gateway.clone()),
                        ],
                    )?;
                }
                return Ok(());
            }
            for chunk in batch.chunks(SEEN_CHUNK) {
                let rows: Vec<SeenRow<'_>> = chunk
                    .iter()
                    .map(|b| SeenRow {
                        id: &b.node_id,
                        seen: b.last_seen_ms,
                        hb: b.heartbeat.as_ref(),
                        pv: b.protocol_version,
                        gw: b.gateway.as_deref(),
                    })
                    .collect();
                tx.exec(
                    "UPDATE node_liveness SET last_seen_ms = v.seen, heartbeat = v.hb::text, \
                     protocol_version = v.pv, gateway = v.gw \
                     FROM json_to_recordset(CAST($1 AS TEXT)::json) \
                     AS v(id TEXT, seen BIGINT, hb JSON, pv BIGINT, gw TEXT) \
                     WHERE node_liveness.node_id = v.id",
                    &[text(to_json(&rows))],
                )?;
            }
            Ok(())
        })
    }
}

/// Change a node's desired state inside `tx` (raising its generation, with an event).
fn desired_in(
    tx: &mut dyn Tx,
    id: &str,
    now_ms: u64,
    what: &str,
    change: &dyn Fn(&mut DesiredState),
) -> Result<DesiredState, RegistryError> {
    let rows = tx.query("SELECT desired, revoked FROM nodes WHERE id = $1", &[text(id)])?;
    let Some(r) = rows.first() else {
        return Err(Refusal::UnknownNode { node: id.to_string() }.into());
    };
    let mut desired: DesiredState = json(col(r, 0), "desired", id)?;
    change(&mut desired);
    desired.generation += 1;
    tx.exec(
        "UPDATE nodes SET desired = $2, update_channel = $3 WHERE id = $1",
        &[text(id), text(to_json(&desired)), text(&desired.update_channel)],
    )?;
    add_event(
        tx,
        now_ms,
        Some(id),
        "desired",
        &format!("{what} (generation {})", desired.generation),
    )?;
    Ok(desired)
}

/// Why the token with this hash cannot be used now (read after the consuming update matched
/// nothing).
fn token_refusal(tx: &mut dyn Tx, hash: &str, now_ms: u64) -> Result<Refusal, DbError> {
    let rows = tx.query(
        "SELECT id, expires_ms, max_uses, uses, revoked FROM tokens WHERE hash = $1",
        &[text(hash)],
    )?;
    let Some(t) = rows.first() else { return Ok(Refusal::UnknownToken) };
    let id = s(col(t, 0));
    Ok(if i(col(t, 4)) != 0 {
        Refusal::RevokedToken { id }
    } else if i(col(t, 1)) as u64 <= now_ms {
        Refusal::ExpiredToken { id }
    } else {
        Refusal::UsedUpToken { id, max_uses: i(col(t, 2)) as u32 }
    })
}

/// Check and consume the token, then create the node (or re-enroll known hardware) inside `tx`.
///
/// Round trips matter on PostgreSQL (each statement is one, and the database shares the fleet's
/// core in the benchmark): a new node costs two statements there, the token's conditional
/// `UPDATE` that also returns which node has this hardware, and one statement that inserts the
/// node, its liveness row and its `enrolled` event (data-modifying `WITH`, which SQLite lacks:
/// there, in process, the three inserts are separate statements).
fn enroll_in(
    tx: &mut dyn Tx,
    postgres: bool,
    e: &Enrollment,
    now_ms: u64,
    sign: &mut dyn FnMut(&str) -> Result<CertRecord, String>,
) -> Result<(String, bool), RegistryError> {
    // Consume a use first, and look the hardware up in the same statement; only a refusal reads
    // why.
    let won = tx.query(
        "UPDATE tokens SET uses = uses + 1 WHERE hash = $1 AND uses < max_uses AND revoked = 0 \
         AND expires_ms > $2 RETURNING id, labels, \
         (SELECT id FROM nodes WHERE dmi_uuid = $3 AND board_serial = $4), \
         (SELECT revoked FROM nodes WHERE dmi_uuid = $3 AND board_serial = $4), update_channel",
        &[
            text(&e.token_hash),
            int(now_ms),
            text(&e.hardware.dmi_uuid),
            text(&e.hardware.board_serial),
        ],
    )?;
    let Some(t) = won.first() else { return Err(token_refusal(tx, &e.token_hash, now_ms)?.into()) };
    let token_id = s(col(t, 0));
    // A refusal after this point gives the use back, so a refused enrollment changes nothing.
    let give_back = |tx: &mut dyn Tx| {
        tx.exec("UPDATE tokens SET uses = uses - 1 WHERE id = $1", &[text(&token_id)])
    };
    let labels: BTreeMap<String, String> = json(col(t, 1), "labels", &token_id)?;
    let hardware = to_json(&e.hardware);
    let gpus = to_json(&e.gpus);
    if let Some(node) = os(col(t, 2)) {
        if i(col(t, 3)) != 0 {
            give_back(tx)?;
            return Err(Refusal::RevokedHardware { node }.into());
        }
        let cert = match sign(&node) {
            Ok(c) => c,
            Err(why) => {
                give_back(tx)?;
                return Err(Refusal::Signing(why).into());
            }
        };
        tx.exec(
                "UPDATE nodes SET token_id = $2, hardware = $3, hostname = $4, gpus = $5, agent_version = $6,
                    enrolled_ms = $7, cert_serial = $8, cert_not_after_ms = $9 WHERE id = $1",
                &[
                    text(&node),
                    text(&token_id),
                    text(&hardware),
                    text(&e.hostname),
                    text(&gpus),
                    text(&e.agent_version),
                    int(now_ms),
                    text(&cert.serial),
                    int(cert.not_after_ms),
                ],
            )?;
        add_event(
            tx,
            now_ms,
            Some(&node),
            "re-enrolled",
            &format!("known hardware re-enrolled with token {token_id}"),
        )?;
        return Ok((node, false));
    }
    let node = e.new_id.clone();
    let cert = match sign(&node) {
        Ok(c) => c,
        Err(why) => {
            give_back(tx)?;
            return Err(Refusal::Signing(why).into());
        }
    };
    let desired = DesiredState {
        generation: 1,
        drain: false,
        power_budget_w: None,
        labels: labels.clone(),
        update_channel: s(col(t, 4)),
        update_version: None,
    };
    let message = format!("{} with {} GPU(s), token {token_id}", e.hostname, e.gpus.len());
    let mut params = vec![
        text(&node),
        text(&token_id),
        text(&e.hardware.dmi_uuid),
        text(&e.hardware.board_serial),
        text(&hardware),
        text(&e.hostname),
        text(&gpus),
        text(&e.agent_version),
        int(now_ms),
        text(&cert.serial),
        int(cert.not_after_ms),
        text(to_json(&desired)),
        text(&desired.update_channel),
    ];
    const INSERT_NODE: &str = "INSERT INTO nodes (id, token_id, dmi_uuid, board_serial, hardware, \
        hostname, gpus, agent_version, enrolled_ms, cert_serial, cert_not_after_ms, desired, update_channel, \
        revoked) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 0)";
    if postgres {
        // The node, its liveness row and its event in one statement (one round trip).
        params.push(text(&message));
        tx.exec(
            &format!(
                "WITH n AS ({INSERT_NODE} RETURNING id), \
                 l AS (INSERT INTO node_liveness (node_id) SELECT id FROM n) \
                 INSERT INTO events (at_ms, node_id, kind, message) \
                 SELECT $9, id, 'enrolled', $14 FROM n"
            ),
            &params,
        )?;
    } else {
        tx.exec(INSERT_NODE, &params)?;
        // Its liveness row, which every liveness batch updates from now on.
        tx.exec("INSERT INTO node_liveness (node_id) VALUES ($1)", &[text(&node)])?;
        add_event(tx, now_ms, Some(&node), "enrolled", &message)?;
    }
    Ok((node, true))
}
