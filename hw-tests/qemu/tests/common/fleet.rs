//! A real `hearth-fleet` on the host's loopback for the QEMU tests: the guest reaches it at
//! `https://10.0.2.2:PORT`; an admin operator reads nodes and events over its API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::fleet::{EventView, NodeView, TokenCreateRequest, TokenCreated};
use hearth_qemu::HOST_FROM_GUEST;

/// A running fleet and an admin client of it; stopped on drop.
pub struct TestFleet {
    runtime: tokio::runtime::Runtime,
    running: Option<hearth_fleet::server::RunningFleet>,
    ep: Endpoint,
    admin: Arc<rustls::ClientConfig>,
    _dir: PathBuf,
}

impl TestFleet {
    /// Start a fleet with its state in `dir` (emptied first) and create a one-use enrollment
    /// token; returns the fleet and the token's seed (what a node boots with).
    pub fn start(dir: &Path) -> Result<(Self, String), Box<dyn std::error::Error>> {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let _ = std::fs::remove_dir_all(dir);
        let config = FleetConfig {
            listen: format!("127.0.0.1:{port}").parse()?,
            public_url: Some(format!("https://{HOST_FROM_GUEST}:{port}")),
            state_dir: dir.to_path_buf(),
            ..FleetConfig::default()
        };
        let running = runtime.block_on(hearth_fleet::server::start(config))?;
        let (op, key) =
            running.fleet.ca.operator_cert("qemu-test", Role::Admin, Duration::from_secs(7200))?;
        let admin = client_config(
            &running.fleet.ca.pin(),
            Some(&ClientIdentity { cert_pem: op.cert_pem, key_pem: key }),
            b"http/1.1",
        )?;
        let ep =
            Endpoint::from_url(&format!("https://{}", running.addr), &running.fleet.config.name)?;
        let req = TokenCreateRequest {
            labels: Default::default(),
            ttl_s: 7200,
            max_uses: 1,
            channel: None,
        };
        let token: TokenCreated =
            runtime.block_on(json(&ep, admin.clone(), "POST", "/v1/tokens", Some(&req)))?;
        let fleet = Self { runtime, running: Some(running), ep, admin, _dir: dir.to_path_buf() };
        Ok((fleet, token.seed))
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Result<Vec<NodeView>, Box<dyn std::error::Error>> {
        Ok(self.runtime.block_on(json::<(), _>(
            &self.ep,
            self.admin.clone(),
            "GET",
            "/v1/nodes",
            None,
        ))?)
    }

    /// Wait until the fleet lists a node online with a heartbeat (at most `timeout`); the error
    /// carries the nodes seen and the guest's last console lines.
    pub fn wait_online(
        &self,
        vm: &hearth_qemu::Vm,
        timeout: Duration,
    ) -> Result<NodeView, Box<dyn std::error::Error>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let nodes = self.nodes()?;
            if let Some(n) = nodes.iter().find(|n| n.online && n.heartbeat.is_some()) {
                return Ok(n.clone());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "the node never came online in the fleet: {nodes:?}\n{}",
                    vm.tail(60)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `GET /v1/events?limit=1000`, oldest first.
    pub fn events(&self) -> Result<Vec<EventView>, Box<dyn std::error::Error>> {
        let mut events: Vec<EventView> = self.runtime.block_on(json::<(), _>(
            &self.ep,
            self.admin.clone(),
            "GET",
            "/v1/events?limit=1000",
            None,
        ))?;
        events.sort_by_key(|e| e.id);
        Ok(events)
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            self.runtime.block_on(r.stop());
        }
    }
}
