//! `hearthctl exec` and `hearthctl api`, end to end: the hearthctl binary → a real hearth-fleet
//! (the gateway) → the agent's tunnel code on an enrolled node → a real process.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hearth_agent::config::TunnelConfig as Policy;
use hearth_agent::fleet::tunnel::{Targets, serve};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_fleet_client::tunnel::{TunnelConfig, connect};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity, TokenCreateRequest, TokenCreated};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_api_through_the_gateway() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        registry: Some(format!("sqlite:{}", dir.path().join("registry.db").display())),
        ..FleetConfig::default()
    };
    let running = hearth_fleet::server::start(config).await?;
    let fleet = running.fleet.clone();
    let pin = fleet.ca.pin();
    let url = format!("https://{}", running.addr);
    let ep = Endpoint::from_url(&url, "hearth-fleet")?;
    let write_ctl = |role: Role,
                     name: &str|
     -> Result<std::path::PathBuf, Box<dyn std::error::Error + Send + Sync>> {
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
    let admin_toml = write_ctl(Role::Admin, "alice")?;
    let viewer_toml = write_ctl(Role::Viewer, "victor")?;

    // Enroll a node and bring its tunnel up with the agent's own target code.
    let (c, k) = fleet.ca.operator_cert("setup", Role::Admin, Duration::from_secs(3600))?;
    let admin_id = ClientIdentity { cert_pem: c.cert_pem, key_pem: k };
    let req =
        TokenCreateRequest { labels: BTreeMap::new(), ttl_s: 600, max_uses: 1, channel: None };
    let http = client_config(&pin, Some(&admin_id), b"http/1.1")?;
    let token: TokenCreated = json(&ep, http, "POST", "/v1/tokens", Some(&req)).await?;
    let key = generate_key_pem()?;
    let enrolled = enroll(
        &ep,
        &pin,
        &EnrollRequest {
            token: token.token,
            csr_pem: csr_pem(&key, "node1")?,
            hardware: HardwareIdentity {
                dmi_uuid: "4c4c4544-0000-0000-0000-000000000001".into(),
                board_serial: "SN1".into(),
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
    let api_sock = dir.path().join("api.sock");
    let api = tokio::net::UnixListener::bind(&api_sock)?;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = api.accept().await {
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req).await;
            let _ = c
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"state\":\"ready\"}")
                .await;
        }
    });
    let mut t = connect(&ep, &pin, &id, TunnelConfig::default()).await?;
    let targets = Arc::new(Targets {
        api_socket: api_sock,
        policy: Policy { enabled: true, exec: true, expose_ports: vec![], ..Policy::default() },
    });
    tokio::spawn(async move {
        while let Some(inc) = t.incoming.recv().await {
            tokio::spawn(serve(targets.clone(), inc));
        }
    });
    for _ in 0..100 {
        if fleet.gateway.node(&node).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let ctl = |cfg: &std::path::Path, args: &[&str]| {
        let cfg = cfg.to_path_buf();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_hearthctl"))
                .arg("--config")
                .arg(cfg)
                .args(args)
                .output()
        })
    };
    let out = ctl(&admin_toml, &["exec", &node, "--", "sh", "-c", "echo hello from $0; exit 7"])
        .await??;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from sh\n");
    assert_eq!(out.status.code(), Some(7), "the command's exit status: {out:?}");

    let out = ctl(&admin_toml, &["exec", &node, "--", "true"]).await??;
    assert_eq!(out.status.code(), Some(0));

    let out = ctl(&viewer_toml, &["exec", &node, "--", "id"]).await??;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exec id needs the admin role"), "{err}");

    let out = ctl(&viewer_toml, &["api", &node, "/v1/status"]).await??;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"state\":\"ready\"}\n");

    // A shell, driven without a terminal: typed input, the output, the shell's status; viewers
    // are refused; the session is recorded as events.
    let shell = |cfg: &std::path::Path, input: &'static [u8]| {
        let cfg = cfg.to_path_buf();
        let node = node.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
            use std::io::Write as _;
            let mut child = Command::new(env!("CARGO_BIN_EXE_hearthctl"))
                .arg("--config")
                .arg(cfg)
                .args(["shell", &node])
                .env("TERM", "xterm")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            if let Some(mut i) = child.stdin.take() {
                i.write_all(input)?;
            }
            child.wait_with_output()
        })
    };
    let out = shell(&admin_toml, b"echo hi-$((6*7)); stty size; exit 3\n").await??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hi-42"), "{out:?}");
    assert!(text.contains("24 80"), "the default size without a terminal: {text:?}");
    assert_eq!(out.status.code(), Some(3), "the shell's exit status: {out:?}");
    let out = shell(&viewer_toml, b"exit\n").await??;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shell needs the admin role"), "{out:?}");
    let events = ctl(&admin_toml, &["events", "--limit", "50"]).await??;
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("tunnel-open") && events.contains("operator alice: shell"), "{events}");
    assert!(events.contains("victor: shell needs the admin role"), "{events}");

    // The node's update channel (not a tunnel command; this test has a node enrolled).
    let out = ctl(&admin_toml, &["channel", &node, "canary"]).await??;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("node {node} on update channel canary (generation ")),
        "{text}"
    );
    let out = ctl(&viewer_toml, &["nodes", "show", &node]).await??;
    assert!(String::from_utf8_lossy(&out.stdout).contains(" channel canary "), "{out:?}");
    let out = ctl(&viewer_toml, &["nodes", "list"]).await??;
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains(" CHANNEL ") && header.contains(" OS "), "{table}");
    assert!(table.lines().any(|l| l.starts_with(&node) && l.contains(" canary ")), "{table}");
    let events = ctl(&viewer_toml, &["events", "--limit", "5"]).await??;
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("update channel canary"),
        "{events:?}"
    );

    let out = ctl(&admin_toml, &["exec", "n-missing", "--", "true"]).await??;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node n-missing has no tunnel"),
        "{out:?}"
    );
    running.stop().await;
    Ok(())
}
