//! The tunnel through a firewall and a link outage, with real processes in a network namespace
//! (`docs/0006-tunnel.md`, "Tests"): `hearth-fleet` in the root namespace on the veth's address,
//! `hearth-agent` (simulated GPUs) in namespace `hearth-tN` whose nftables input policy drops
//! every packet but loopback and established/related ones.
//!
//! 1. An inbound connection to the node fails (and succeeded before the firewall, so the check can
//!    fail), yet `hearthctl exec`, `hearthctl api` and the ingress paths (`hearthctl forward` and
//!    a gateway port made by `hearthctl expose`, both to a TCP echo server on the node) work
//!    through the tunnel the node opened.
//! 2. The node's control session rides its tunnel (the fleet counts one tunnel carrying a
//!    session), and the gateway's lanes are open. The link goes down for 30 s while 1,000
//!    numbered commands are queued through the fleet's API; after it returns the tunnel is back
//!    within the backoff bound (the agent's largest scheduled retry plus the connect timeout),
//!    every command is acknowledged within [`SESSION_AFTER_TUNNEL`] of the tunnel, exactly once
//!    (one ack recorded per command at the fleet), and the node ran each exactly once, in order
//!    (its log). The recovery times are printed (`docs/benchmarks.md`).
//!
//! Needs root, `ip netns` and `nft`: `#[ignore]`d; `scripts/test` runs it as root:
//! `cargo nextest run -p hearth-netns --run-ignored only --no-capture` (`HEARTH_NETNS_KEEP=1`
//! keeps the processes' logs).

// The measured recovery times are the test's report.
#![allow(clippy::print_stdout)]

use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hearth_fleet_client::https::{Endpoint, json, request};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_netns::{Netns, Proc, bin_dir, log_lines, missing_prerequisites, run};
use hearth_proto::control::CommandKind;
use hearth_proto::fleet::{CommandRequest, CommandView, EventView};

const ECHO_PORT: u16 = 7007;
const OUTAGE: Duration = Duration::from_secs(30);
const COMMANDS: usize = 1000;
/// The client's TCP connect timeout (`hearth_fleet_client::https::CONNECT_TIMEOUT`).
const CONNECT_TIMEOUT: Duration = hearth_fleet_client::https::CONNECT_TIMEOUT;
/// The most the last command's ack may lag the tunnel's return: the session's Hello and Welcome
/// on the new tunnel and 1,000 acks (0.2–1.0 s on a 2-core machine), with room for a slower
/// one. A session on a connection of its own, riding that connection's retransmission backoff,
/// lagged 8.5–17 s.
const SESSION_AFTER_TUNNEL: Duration = Duration::from_secs(5);

/// The test's directory: removed at the end, or kept (`HEARTH_NETNS_KEEP`).
enum Kept {
    Temp(tempfile::TempDir),
    Dir(std::path::PathBuf),
}

impl Kept {
    fn path(&self) -> &std::path::Path {
        match self {
            Self::Temp(t) => t.path(),
            Self::Dir(p) => p,
        }
    }
}

fn echo_roundtrip(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let sa = addr.to_socket_addrs()?.next().context("no address")?;
    let mut s = TcpStream::connect_timeout(&sa, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"ping 42\n")?;
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf)?;
    ensure!(&buf == b"ping 42\n", "echo answered {buf:?}");
    Ok(())
}

fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Ctl {
    bin: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl Ctl {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("hearthctl"));
        c.arg("--config").arg(&self.config).args(args);
        c
    }
    fn out(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.cmd(args))
    }
}

#[test]
#[ignore = "needs root, ip netns and nft: scripts/test runs it as root"]
fn tunnel_through_a_firewall_and_a_link_outage() -> anyhow::Result<()> {
    if let Some(why) = missing_prerequisites() {
        bail!("the namespace test {why}");
    }
    let bin = bin_dir()?;
    let dir = tempfile::tempdir()?;
    // HEARTH_NETNS_KEEP=1 keeps the processes' logs (the directory is printed).
    let dir = if std::env::var_os("HEARTH_NETNS_KEEP").is_some() {
        let kept = dir.keep();
        println!("logs kept in {}", kept.display());
        Kept::Dir(kept)
    } else {
        Kept::Temp(dir)
    };
    let d = dir.path();
    let tag = std::process::id() % 10_000;
    let ns = Netns::create(tag)?;

    // The workload on the node: an echo server, reachable from outside before the firewall.
    let echo_bin = env!("CARGO_BIN_EXE_netns-echo");
    let mut echo_cmd = ns.cmd(echo_bin);
    echo_cmd.arg(format!("0.0.0.0:{ECHO_PORT}"));
    let _echo = Proc::spawn(echo_cmd, &d.join("echo.log"))?;
    let inbound = format!("{}:{ECHO_PORT}", ns.inner_addr);
    wait_for(
        "the echo server, reached from outside before the firewall",
        Duration::from_secs(10),
        || Ok(echo_roundtrip(&inbound, Duration::from_secs(1)).ok()),
    )?;
    ns.firewall_inbound()?;
    let refused = echo_roundtrip(&inbound, Duration::from_secs(3));
    ensure!(refused.is_err(), "an inbound connection to the node got through the firewall");
    println!(
        "inbound connection to the node: {:#}",
        refused.err().unwrap_or_else(|| anyhow::anyhow!("?"))
    );

    // The fleet on the root end of the veth.
    let port = std::net::TcpListener::bind((ns.outer_addr.as_str(), 0))?.local_addr()?.port();
    let expose = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let fleet_toml = d.join("fleet.toml");
    std::fs::write(
        &fleet_toml,
        format!(
            "listen = \"{}:{port}\"\nstate_dir = \"{}\"\nflush_interval_ms = 500\n\
             expose_ports = [{expose}, {}]\n",
            ns.outer_addr,
            d.join("fleet").display(),
            expose.saturating_add(20),
        ),
    )?;
    run(Command::new(bin.join("hearth-fleet"))
        .arg("--config")
        .arg(&fleet_toml)
        .args(["operator-cert", "--name", "netns-admin", "--role", "admin", "--out"])
        .arg(d.join("operator")))?;
    let mut fleet_cmd = Command::new(bin.join("hearth-fleet"));
    fleet_cmd.arg("--config").arg(&fleet_toml).arg("serve");
    let mut fleet = Proc::spawn(fleet_cmd, &d.join("fleet.log"))?;
    let fleet_addr = format!("{}:{port}", ns.outer_addr);
    wait_for("hearth-fleet listening", Duration::from_secs(20), || {
        ensure!(fleet.alive(), "hearth-fleet exited: {}", fleet.tail(20));
        Ok(TcpStream::connect(&fleet_addr).ok())
    })?;
    let ctl = Ctl { bin: bin.clone(), config: d.join("operator/hearthctl.toml") };
    let seed = ctl.out(&["tokens", "create", "--max-uses", "1", "--ttl-hours", "1"])?;
    std::fs::write(d.join("seed.toml"), &seed)?;

    // The node: the agent on 2 simulated GPUs inside the namespace.
    let node_dir = d.join("node");
    std::fs::create_dir_all(&node_dir)?;
    let agent_toml = node_dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[api]\nsocket = \"{n}/agent.sock\"\n[state]\ndir = \"{n}/state\"\n[gpu]\nbackend = \"sim\"\n[sim]\ngpus = 2\nseed = 7\n[log]\nformat = \"json\"\n[fleet]\nseed = \"{s}\"\n[tunnel]\nexpose_ports = [{ECHO_PORT}]\n",
            n = node_dir.display(),
            s = d.join("seed.toml").display()
        ),
    )?;
    let mut agent_cmd = ns.cmd(bin.join("hearth-agent"));
    agent_cmd.arg("run").arg("--config").arg(&agent_toml);
    let mut agent = Proc::spawn(agent_cmd, &node_dir.join("agent.log"))?;
    let node = wait_for("the node online at the fleet", Duration::from_secs(60), || {
        ensure!(agent.alive(), "hearth-agent exited: {}", agent.tail(20));
        let list: serde_json::Value =
            serde_json::from_str(&ctl.out(&["nodes", "list", "--json"])?)?;
        let online = list.as_array().and_then(|a| {
            a.iter()
                .find(|n| n["online"] == true)
                .and_then(|n| n["id"].as_str().map(str::to_string))
        });
        Ok(online)
    })?;
    let tunnel_up = |limit: Duration| {
        wait_for("hearthctl exec through the tunnel", limit, || {
            Ok(ctl.cmd(&["exec", &node, "--", "true"]).output()?.status.success().then_some(()))
        })
    };
    tunnel_up(Duration::from_secs(30))?;

    // exec runs on the node (its namespace's address), api reaches its local API, forward
    // reaches the workload: all through the tunnel the node opened.
    let addrs = ctl.out(&["exec", &node, "--", "ip", "-o", "-4", "addr", "show"])?;
    ensure!(addrs.contains(&ns.inner_addr), "exec did not run in the node's namespace: {addrs}");
    let status: serde_json::Value =
        serde_json::from_str(&ctl.out(&["api", &node, "/v1/status"])?)?;
    let gpus = status["gpus"].as_array().map_or(0, Vec::len);
    ensure!(gpus == 2, "the node's API reports {gpus} GPUs: {status}");
    let mut fwd_cmd = ctl.cmd(&["forward", &node, &ECHO_PORT.to_string(), "--listen"]);
    let fwd_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    fwd_cmd.arg(format!("127.0.0.1:{fwd_port}"));
    let _fwd = Proc::spawn(fwd_cmd, &d.join("forward.log"))?;
    wait_for("the workload through hearthctl forward", Duration::from_secs(10), || {
        Ok(echo_roundtrip(&format!("127.0.0.1:{fwd_port}"), Duration::from_secs(2)).ok())
    })?;
    // Ingress on the gateway: `hearthctl expose` makes a fleet port forward to the workload.
    let exposed: hearth_proto::fleet::ExposeView =
        serde_json::from_str(&ctl.out(&["--json", "expose", &node, &ECHO_PORT.to_string()])?)?;
    wait_for("the workload through hearthctl expose", Duration::from_secs(10), || {
        Ok(echo_roundtrip(&exposed.address, Duration::from_secs(2)).ok())
    })?;
    ensure!(
        echo_roundtrip(&inbound, Duration::from_secs(2)).is_err(),
        "the firewall let an inbound connection through"
    );

    // The link goes down for 30 s while 1,000 commands are queued.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ctl_cfg: toml_lite::Cfg = toml_lite::read(&d.join("operator/hearthctl.toml"))?;
    let ep = Endpoint::from_url(&ctl_cfg.url, &ctl_cfg.name)?;
    let id = ClientIdentity {
        cert_pem: std::fs::read_to_string(&ctl_cfg.cert)?,
        key_pem: std::fs::read_to_string(&ctl_cfg.key)?,
    };
    let http = client_config(&ctl_cfg.ca_sha256, Some(&id), b"http/1.1")?;
    // The node opened the lanes its gateway offered (they carried the forward and the ingress).
    let metrics = rt.block_on(request(&ep, http.clone(), "GET", "/metrics", None))?;
    let text = String::from_utf8_lossy(&metrics.body);
    let lanes = text
        .lines()
        .find_map(|l| l.strip_prefix("hearth_fleet_tunnel_lanes "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    ensure!(lanes == Some(2.0), "the fleet reports lanes {lanes:?}, not 2: {text}");
    let carried = text
        .lines()
        .find_map(|l| l.strip_prefix("hearth_fleet_tunnel_sessions "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    ensure!(
        carried == Some(1.0),
        "the fleet reports {carried:?} tunnels carrying a session, not 1"
    );
    let path = format!("/v1/nodes/{node}/commands");
    let outage = ns.outage()?;
    let down = Instant::now();
    let mut ids = Vec::with_capacity(COMMANDS);
    for _ in 0..COMMANDS {
        let req = CommandRequest { kind: CommandKind::RunDiagnostics };
        let c: CommandView = rt.block_on(json(&ep, http.clone(), "POST", &path, Some(&req)))?;
        ids.push(c.id);
    }
    let queued = down.elapsed();
    ensure!(
        queued < OUTAGE,
        "queueing {COMMANDS} commands took {queued:?}, longer than the outage"
    );
    std::thread::sleep(OUTAGE - queued);
    outage.end()?;
    let up = Instant::now();
    println!(
        "link down {:.1} s; {COMMANDS} commands queued in {:.1} s",
        down.elapsed().as_secs_f64(),
        queued.as_secs_f64()
    );

    // The bound: the agent's largest scheduled tunnel retry, plus a connect attempt in flight.
    tunnel_up(Duration::from_secs(90))?;
    let tunnel_recovery = up.elapsed();
    let agent_log = node_dir.join("agent.log");
    // The session and its tunnel reconnect together ("fleet session ended"); a tunnel of its own
    // (a gateway that does not carry sessions) logs its retries apart.
    let retries: Vec<u64> = ["tunnel reconnect scheduled", "fleet session ended"]
        .iter()
        .flat_map(|m| log_lines(&agent_log, m))
        .filter_map(|f| f.get("retry_in_ms").and_then(serde_json::Value::as_u64))
        .collect();
    let bound = Duration::from_millis(retries.iter().copied().max().unwrap_or(0))
        + CONNECT_TIMEOUT
        + Duration::from_secs(2);
    println!(
        "tunnel recovery after the link returned: {:.2} s (bound {:.1} s; tunnel retries scheduled {retries:?} ms)",
        tunnel_recovery.as_secs_f64(),
        bound.as_secs_f64()
    );
    ensure!(
        tunnel_recovery <= bound,
        "the tunnel came back after {tunnel_recovery:?}, over the backoff bound {bound:?}"
    );

    // Every command acknowledged exactly once.
    let acked = wait_for("every command acknowledged", Duration::from_secs(90), || {
        let cs: Vec<CommandView> =
            rt.block_on(json::<(), _>(&ep, http.clone(), "GET", &path, None))?;
        let done = cs.iter().filter(|c| ids.contains(&c.id) && c.outcome.is_some()).count();
        Ok((done == COMMANDS).then_some(cs))
    })?;
    let control_recovery = up.elapsed();
    let stalled = log_lines(&agent_log, "fleet session ended")
        .iter()
        .filter(|f| {
            f.get("error").and_then(|e| e.as_str()).is_some_and(|e| {
                e.starts_with("nothing from the fleet") && e.contains("works again")
            })
        })
        .count();
    println!(
        "all {COMMANDS} commands acknowledged {:.2} s after the link returned ({stalled} stalled session(s) started over)",
        control_recovery.as_secs_f64()
    );
    ensure!(
        control_recovery <= tunnel_recovery + SESSION_AFTER_TUNNEL,
        "the last ack came {control_recovery:?} after the link returned, the tunnel {tunnel_recovery:?}: \
         the control session did not follow the tunnel within {SESSION_AFTER_TUNNEL:?}"
    );
    ensure!(acked.len() == COMMANDS, "{} commands at the fleet, {COMMANDS} sent", acked.len());
    let events: Vec<EventView> =
        rt.block_on(json::<(), _>(&ep, http.clone(), "GET", "/v1/events?limit=10000", None))?;
    let mut ack_ids: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == "command-ack")
        .filter_map(|e| e.message.strip_prefix("command ")?.split(':').next()?.parse().ok())
        .collect();
    ack_ids.sort_unstable();
    ensure!(
        ack_ids == ids,
        "acks recorded at the fleet are not one per command ({} for {COMMANDS})",
        ack_ids.len()
    );

    // The node ran each command once, in order; repeats (resent after the reconnect) were
    // acked again without running.
    let ran: Vec<u64> = log_lines(&agent_log, "fleet command")
        .iter()
        .filter_map(|f| f.get("id").and_then(serde_json::Value::as_u64))
        .collect();
    ensure!(
        ran == ids,
        "the node ran {} commands, not each of the {COMMANDS} once in order",
        ran.len()
    );
    let repeats = log_lines(&agent_log, "fleet command repeated: acked again, not run").len();
    println!(
        "node ran {} commands once each, in order; {repeats} resent commands acked again",
        ran.len()
    );

    // Still nothing gets in, and the tunnel still serves.
    ensure!(echo_roundtrip(&inbound, Duration::from_secs(2)).is_err(), "inbound got through");
    let out = ctl.out(&["exec", &node, "--", "echo", "still here"])?;
    ensure!(out == "still here\n", "exec after the outage: {out:?}");
    ensure!(fleet.alive() && agent.alive(), "a process died");
    Ok(())
}

/// `hearthctl.toml`'s fields, read without the hearthctl crate (a test of the binaries).
mod toml_lite {
    use anyhow::Context as _;

    pub struct Cfg {
        pub url: String,
        pub name: String,
        pub ca_sha256: String,
        pub cert: String,
        pub key: String,
    }

    pub fn read(path: &std::path::Path) -> anyhow::Result<Cfg> {
        let text = std::fs::read_to_string(path)?;
        let get = |k: &str| -> anyhow::Result<String> {
            text.lines()
                .find_map(|l| {
                    let (key, v) = l.split_once('=')?;
                    (key.trim() == k).then(|| v.trim().trim_matches('"').to_string())
                })
                .with_context(|| format!("{} has no {k}", path.display()))
        };
        Ok(Cfg {
            url: get("url")?,
            name: get("name")?,
            ca_sha256: get("ca_sha256")?,
            cert: get("cert")?,
            key: get("key")?,
        })
    }
}
