//! Shared helpers of the fleet's integration tests: a fleet on a free loopback port with a
//! private state directory, on SQLite or on a fresh database of the test PostgreSQL server.
#![allow(dead_code, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet::server::{RunningFleet, start};
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity, TokenCreateRequest, TokenCreated};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Which registry backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A fresh PostgreSQL database URL, or None when there is no test server (a failure under CI).
pub fn postgres_db() -> Option<String> {
    let Ok(base) = std::env::var("HEARTH_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "HEARTH_TEST_POSTGRES_URL is not set: scripts/test starts a PostgreSQL server for these tests"
        );
        eprintln!(
            "HEARTH_TEST_POSTGRES_URL not set: skipping the PostgreSQL half (run scripts/test)"
        );
        return None;
    };
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    let name = format!("hearth_test_{}", b.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let base2 = base.clone();
    let n2 = name.clone();
    let created = std::thread::spawn(move || -> Result<(), postgres::Error> {
        let mut c = postgres::Client::connect(&base2, postgres::NoTls)?;
        c.batch_execute(&format!("CREATE DATABASE {n2}"))
    })
    .join();
    match created {
        Ok(Ok(())) => {}
        other => panic!("cannot create a test database on {base}: {other:?}"),
    }
    let (prefix, _) = base.rsplit_once('/').unwrap_or((&base, ""));
    Some(format!("{prefix}/{name}"))
}

/// The registry URL for `db` in `dir`, or None to skip.
pub fn registry_url(db: Db, dir: &std::path::Path) -> Option<String> {
    match db {
        Db::Sqlite => Some(format!("sqlite:{}", dir.join("registry.db").display())),
        Db::Postgres => postgres_db(),
    }
}

#[derive(Debug)]
pub struct TestFleet {
    pub dir: tempfile::TempDir,
    pub running: RunningFleet,
    pub admin: ClientIdentity,
    pub viewer: ClientIdentity,
    pub url: String,
}

impl TestFleet {
    pub fn ep(&self) -> Endpoint {
        Endpoint::from_url(&format!("https://{}", self.running.addr), "hearth-fleet")
            .unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn pin(&self) -> String {
        self.running.fleet.ca.pin()
    }
    pub fn http(&self, id: Option<&ClientIdentity>) -> Arc<rustls::ClientConfig> {
        client_config(&self.pin(), id, b"http/1.1").unwrap_or_else(|e| panic!("{e}"))
    }
    pub async fn token(&self, max_uses: u32, ttl_s: u64) -> TokenCreated {
        let req = TokenCreateRequest {
            labels: BTreeMap::from([("site".to_string(), "lab".to_string())]),
            ttl_s,
            max_uses,
            channel: None,
        };
        json(&self.ep(), self.http(Some(&self.admin)), "POST", "/v1/tokens", Some(&req))
            .await
            .unwrap_or_else(|e| panic!("token create: {e}"))
    }
    pub fn dump(&self) -> BTreeMap<String, Vec<String>> {
        // The PostgreSQL client blocks: leave the async context for it.
        tokio::task::block_in_place(|| self.running.fleet.registry.dump())
            .unwrap_or_else(|e| panic!("dump: {e}"))
    }
}

pub async fn fleet_on(db: Db) -> Option<TestFleet> {
    let dir = tempfile::tempdir().ok()?;
    let url = registry_url(db, dir.path())?;
    let config = FleetConfig {
        listen: "127.0.0.1:0".parse().ok()?,
        state_dir: dir.path().join("fleet"),
        registry: Some(url.clone()),
        flush_interval_ms: 200,
        ..FleetConfig::default()
    };
    let running = start(config).await.unwrap_or_else(|e| panic!("fleet start: {e:#}"));
    let mk = |role| {
        let (i, key) = running
            .fleet
            .ca
            .operator_cert("tester", role, Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("{e}"));
        ClientIdentity { cert_pem: i.cert_pem, key_pem: key }
    };
    let admin = mk(Role::Admin);
    let viewer = mk(Role::Viewer);
    Some(TestFleet { dir, running, admin, viewer, url })
}

/// An enrollment request for new hardware `n`, and its key.
pub fn enroll_request(token: &str, n: u32) -> (EnrollRequest, String) {
    let key = generate_key_pem().unwrap_or_else(|e| panic!("{e}"));
    let csr = csr_pem(&key, "node").unwrap_or_else(|e| panic!("{e}"));
    (
        EnrollRequest {
            token: token.to_string(),
            csr_pem: csr,
            hardware: HardwareIdentity {
                dmi_uuid: format!("4c4c4544-0000-0000-0000-{n:012}"),
                board_serial: format!("SN{n:06}"),
                gpu_uuids: vec![format!("GPU-{n}")],
            },
            hostname: format!("node{n}"),
            gpus: vec![],
            agent_version: "0.1.0".into(),
        },
        key,
    )
}
