//! `hearthctl expose`, end to end: the hearthctl binary asks a real hearth-fleet to expose a port
//! of an enrolled node; a customer's TCP connection to the gateway port reaches a TCP echo server
//! on the node through the node's tunnel and the agent's own target code. The node's policy
//! (`tunnel.expose_ports`) and the admin role are enforced, the exposure survives a fleet restart
//! and `unexpose` closes the port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hearth_agent::config::TunnelConfig as Policy;
use hearth_agent::fleet::tunnel::{Targets, serve};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet::server::RunningFleet;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_fleet_client::tunnel::{TunnelConfig, connect};
use hearth_proto::fleet::{
    EnrollRequest, ExposeView, HardwareIdentity, TokenCreateRequest, TokenCreated,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A TCP echo server on loopback ("the customer's workload on the node").
async fn echo_server() -> Res<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// Bring the node's tunnel up with the agent's target code and wait until the gateway has it.
async fn node_tunnel(
    running: &RunningFleet,
    id: &ClientIdentity,
    node: &str,
    expose_ports: Vec<u16>,
) -> Res<()> {
    let ep = Endpoint::from_url(&format!("https://{}", running.addr), "hearth-fleet")?;
    let mut t = connect(&ep, &running.fleet.ca.pin(), id, TunnelConfig::default()).await?;
    let targets = Arc::new(Targets {
        api_socket: PathBuf::from("/nonexistent/api.sock"),
        policy: Policy { enabled: true, exec: false, expose_ports, ..Policy::default() },
    });
    tokio::spawn(async move {
        while let Some(inc) = t.incoming.recv().await {
            tokio::spawn(serve(targets.clone(), inc));
        }
    });
    for _ in 0..250 {
        if running.fleet.gateway.node(node).is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("the node's tunnel did not register".into())
}

/// One echo round trip through `addr`.
async fn round_trip(addr: &str, msg: &[u8]) -> Res<Vec<u8>> {
    let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await?.into_split();
    let out = msg.to_vec();
    let writer = tokio::spawn(async move { w.write_all(&out).await.map(|()| w) });
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back)).await??;
    drop(writer.await??);
    Ok(back)
}

fn ctl(
    cfg: &Path,
    args: &[&str],
) -> tokio::task::JoinHandle<std::io::Result<std::process::Output>> {
    let cfg = cfg.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hearthctl")).arg("--config").arg(cfg).args(args).output()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expose_forwards_gateway_ports_to_allowed_node_ports_and_survives_a_restart() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let first = free_port()?;
    let config = FleetConfig {
        listen: format!("127.0.0.1:{}", free_port()?).parse()?,
        state_dir: dir.path().join("fleet"),
        registry: Some(format!("sqlite:{}", dir.path().join("registry.db").display())),
        expose_ports: [first, first.saturating_add(20)],
        ..FleetConfig::default()
    };
    let running = hearth_fleet::server::start(config.clone()).await?;
    let fleet = running.fleet.clone();
    let pin = fleet.ca.pin();
    let url = format!("https://{}", running.addr);
    let ep = Endpoint::from_url(&url, "hearth-fleet")?;
    let write_ctl = |role: Role, name: &str| -> Res<PathBuf> {
        let (cert, key) = fleet.ca.operator_cert(name, role, Duration::from_secs(3600))?;
        let (c, k) =
            (dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")));
        std::fs::write(&c, &cert.cert_pem)?;
        std::fs::write(&k, &key)?;
        let toml = format!(
            "url = \"{url}\"\nname = \"hearth-fleet\"\nca_sha256 = \"{pin}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        );
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, toml)?;
        Ok(p)
    };
    let admin = write_ctl(Role::Admin, "alice")?;
    let viewer = write_ctl(Role::Viewer, "victor")?;

    let (c, k) = fleet.ca.operator_cert("setup", Role::Admin, Duration::from_secs(3600))?;
    let setup = ClientIdentity { cert_pem: c.cert_pem, key_pem: k };
    let req =
        TokenCreateRequest { labels: BTreeMap::new(), ttl_s: 600, max_uses: 1, channel: None };
    let http = client_config(&pin, Some(&setup), b"http/1.1")?;
    let token: TokenCreated = json(&ep, http, "POST", "/v1/tokens", Some(&req)).await?;
    let key = generate_key_pem()?;
    let enrolled = enroll(
        &ep,
        &pin,
        &EnrollRequest {
            token: token.token,
            csr_pem: csr_pem(&key, "node1")?,
            hardware: HardwareIdentity {
                dmi_uuid: "4c4c4544-0000-0000-0000-0000000e0001".into(),
                board_serial: "SNE1".into(),
                gpu_uuids: vec![],
            },
            hostname: "node1".into(),
            gpus: vec![],
            agent_version: "0.1.0".into(),
        },
    )
    .await?;
    let node = enrolled.node_id.clone();
    let id = ClientIdentity { cert_pem: enrolled.cert_pem, key_pem: key };
    let (echo, not_allowed) = (echo_server().await?, echo_server().await?);
    node_tunnel(&running, &id, &node, vec![echo]).await?;

    // A viewer may not create one; the node's policy refuses a port it does not list.
    let out = ctl(&viewer, &["expose", &node, &echo.to_string()]).await??;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("this needs admin"), "{out:?}");
    let out = ctl(&admin, &["expose", &node, &not_allowed.to_string()]).await??;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("refuses port {not_allowed}: port {not_allowed} is not in this node's tunnel.expose_ports")), "{err}");
    let out = ctl(&admin, &["expose", "n-missing", &echo.to_string()]).await??;
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown or revoked node"), "{out:?}");

    // The admin exposes the allowed port: a customer's connection to the gateway port reaches
    // the echo server on the node; asking again returns the same exposure.
    let out = ctl(&admin, &["--json", "expose", &node, &echo.to_string()]).await??;
    assert!(out.status.success(), "{out:?}");
    let e: ExposeView = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (e.node_id.as_str(), e.node_port, e.created_by.as_str()),
        (node.as_str(), echo, "alice")
    );
    assert!((first..=first + 20).contains(&e.gateway_port), "{e:?}");
    assert_eq!(e.address, format!("127.0.0.1:{}", e.gateway_port));
    assert_eq!(
        round_trip(&e.address, b"hello through the gateway").await?,
        b"hello through the gateway"
    );
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(&e.address, &big).await?, big, "300 kB intact both ways");
    let again = ctl(&admin, &["--json", "expose", &node, &echo.to_string()]).await??;
    let again: ExposeView = serde_json::from_slice(&again.stdout)?;
    assert_eq!(again, e);
    let out = ctl(&viewer, &["expose", "--list"]).await??;
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && list.contains(&e.address) && list.contains(&node), "{list}");

    // A fleet restart: the exposure comes back from the registry on the same port and forwards
    // once the node's tunnel is back.
    running.stop().await;
    let running = hearth_fleet::server::start(config.clone()).await?;
    assert_eq!(running.fleet.exposer.listening(), vec![e.gateway_port]);
    node_tunnel(&running, &id, &node, vec![echo]).await?;
    assert_eq!(round_trip(&e.address, b"after restart").await?, b"after restart");

    // unexpose: the port closes; a second unexpose names the problem.
    let out = ctl(&admin, &["unexpose", &e.gateway_port.to_string()]).await??;
    assert!(out.status.success(), "{out:?}");
    let mut closed = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&e.address).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the gateway port still accepts connections after unexpose");
    let out = ctl(&admin, &["unexpose", &e.gateway_port.to_string()]).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no exposure on gateway port {}", e.gateway_port)), "{err}");

    let out = ctl(&admin, &["events", "--limit", "100"]).await??;
    let events = String::from_utf8_lossy(&out.stdout);
    assert_eq!(events.matches("expose-created").count(), 1, "{events}");
    assert!(events.contains("operator alice: gateway port"), "{events}");
    assert!(events.contains("expose-removed"), "{events}");
    running.stop().await;
    Ok(())
}
