//! The agent as a process: systemd notifications, the local API through the CLI, fault
//! injection, power limits, bad configuration, a missing NVML library, SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use hearth_proto::api::{
    GpuVerdict, HealthReport, NodeState, NodeStatus, PowerReport, SubsystemState,
};
use hearth_proto::gpu::GpuEventKind;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BIN: &str = env!("CARGO_BIN_EXE_hearth-agent");

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    /// Notifications read by [`notify_reader`], which, like systemd, reads the socket all the
    /// time (an unread datagram queue would block the agent's sd_notify sends).
    notify: std::sync::mpsc::Receiver<String>,
    stop_reader: std::sync::Arc<std::sync::atomic::AtomicBool>,
    notices: Vec<String>,
}

/// Read every datagram of the fake systemd socket onto a channel until `stop`.
fn notify_reader(
    socket: UnixDatagram,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf)
                && tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err()
            {
                break;
            }
        }
    });
    rx
}

impl Agent {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/agent.sock")
    }

    /// Start `hearth-agent run` with `extra` appended to a sim config, under a fake systemd
    /// (NOTIFY_SOCKET, WATCHDOG_USEC=400 ms for this PID).
    fn start(extra: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("agent.toml");
        let socket = dir.path().join("run/agent.sock");
        std::fs::write(
            &config,
            format!(
                "[api]\nsocket = {:?}\n[log]\nformat = \"json\"\n[state]\ndir = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
                socket.display().to_string(),
                dir.path().join("state").display().to_string()
            ),
        )?;
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_millis(200)))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("WATCHDOG_PID=$$ exec {BIN} run --config {}", config.display()))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "400000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stop_reader = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let notify = notify_reader(notify, stop_reader.clone());
        Ok(Self { child, dir, notify, stop_reader, notices: Vec::new() })
    }

    /// Read notifications until `pred` holds for one, or `timeout`.
    fn wait_notice(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.notices.iter().any(|n| pred(n)) {
            return true;
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(text) = self.notify.recv_timeout(left) {
                let hit = pred(&text);
                self.notices.push(text);
                if hit {
                    return true;
                }
            }
        }
        false
    }

    fn cli(&self, args: &[&str]) -> Result<Output, std::io::Error> {
        Command::new(BIN).args(args).arg("--socket").arg(self.socket()).output()
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        args: &[&str],
    ) -> Result<T, Box<dyn std::error::Error>> {
        let out = self.cli(args)?;
        if !out.status.success() {
            return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn status(&self) -> Result<NodeStatus, Box<dyn std::error::Error>> {
        self.json(&["status", "--json"])
    }

    /// Poll status until `pred` holds (or fail after `timeout`).
    fn status_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&NodeStatus) -> bool,
    ) -> Result<NodeStatus, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.status();
            if let Ok(s) = &last
                && pred(s)
            {
                return last;
            }
            if Instant::now() > deadline {
                return Err(format!("status condition not reached; last: {last:?}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn terminate(&mut self) -> Result<(ExitStatus, Duration), Box<dyn std::error::Error>> {
        let pid = i32::try_from(self.child.id())?;
        let t0 = Instant::now();
        // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, t0.elapsed()));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("agent did not exit 10 s after SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_reader.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

const SIM: &str = "[gpu]\nbackend = \"sim\"\nsample_interval_ms = 200\n[sim]\ngpus = 8\n";

#[test]
fn sim_node_serves_status_notifies_systemd_and_stops_on_sigterm() -> TestResult {
    let mut agent = Agent::start(SIM)?;
    assert!(agent.wait_notice(|n| n.contains("READY=1"), Duration::from_secs(10)), "no READY");
    // Watchdog at half of 400 ms: several pings within a second.
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(1100) {
        if agent.wait_notice(|n| n.contains("WATCHDOG=1"), Duration::from_millis(300)) {
            pings += 1;
            agent.notices.retain(|n| !n.contains("WATCHDOG=1"));
        }
    }
    assert!(pings >= 3, "only {pings} watchdog pings in 1.1 s");

    let status = agent
        .status_until(Duration::from_secs(10), |s| s.gpus.iter().all(|g| g.sample.is_some()))?;
    assert_eq!(status.backend, "sim");
    assert_eq!(status.gpus.len(), 8);
    assert!(status.subsystems.iter().all(|s| s.state == SubsystemState::Running));
    let status = agent.status_until(Duration::from_secs(5), |s| s.state == NodeState::Ready)?;
    for (i, g) in status.gpus.iter().enumerate() {
        assert_eq!(g.inventory.index as usize, i);
        assert!(g.inventory.uuid.starts_with("GPU-"));
        assert_eq!(g.health.verdict, GpuVerdict::Healthy, "{:?}", g.health);
        let s = g.sample.as_ref().ok_or("no sample")?;
        assert!(s.power_avg_mw > 100_000, "training GPU draws {} mW", s.power_avg_mw);
        assert!(s.temp_core_c > 25);
    }
    assert!(agent.wait_notice(|n| n.starts_with("STATUS=ready; 8 GPUs"), Duration::from_secs(5)));

    // Owner-only socket.
    let mode = std::fs::metadata(agent.socket())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The text view names every GPU.
    let out = agent.cli(&["status"])?;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("ready"), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("H100")).count(), 8, "{text}");

    let (code, took) = agent.terminate()?;
    assert!(code.success(), "exit {code:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(agent.wait_notice(|n| n.contains("STOPPING=1"), Duration::from_secs(1)));
    assert!(!agent.socket().exists(), "socket left behind");
    Ok(())
}

#[test]
fn injected_fault_fails_one_gpu_and_the_others_keep_serving() -> TestResult {
    let mut agent = Agent::start(SIM)?;
    assert!(agent.wait_notice(|n| n.contains("READY=1"), Duration::from_secs(10)));
    agent.status_until(Duration::from_secs(10), |s| s.state == NodeState::Ready)?;

    let out = agent.cli(&["sim", "inject", "--gpu", "2", "fallen-off-bus"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = agent.status_until(Duration::from_secs(10), |s| {
        s.gpus[2].health.verdict == GpuVerdict::Failed && s.gpus[2].sample.is_none()
    })?;
    assert_eq!(status.state, NodeState::Degraded);
    assert!(status.gpus[2].sample.is_none());
    for (i, g) in status.gpus.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(g.health.verdict, GpuVerdict::Healthy, "GPU {i}: {:?}", g.health);
        assert!(g.sample.is_some());
    }
    let health: HealthReport = agent.json(&["health", "--json"])?;
    assert!(
        health
            .recent_events
            .iter()
            .any(|e| e.event.gpu == 2 && e.event.kind == GpuEventKind::Xid(79)),
        "{:?}",
        health.recent_events
    );

    // A fault for a GPU that does not exist is refused, naming it.
    let out = agent.cli(&["sim", "inject", "--gpu", "9", "xid", "13"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GPU 9"));
    Ok(())
}

#[test]
fn power_limit_is_set_validated_and_restored_through_the_api() -> TestResult {
    let mut agent = Agent::start(SIM)?;
    assert!(agent.wait_notice(|n| n.contains("READY=1"), Duration::from_secs(10)));
    agent.status_until(Duration::from_secs(10), |s| s.state == NodeState::Ready)?;

    let out = agent.cli(&["power", "set", "--gpu", "1", "--watts", "400"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p: PowerReport = agent.json(&["power", "--json"])?;
        let g = &p.gpus[1];
        if g.limit_mw == Some(400_000) && g.draw_mw.is_some_and(|d| d <= 420_000) {
            assert_eq!(p.gpus[0].limit_mw, Some(700_000));
            break;
        }
        assert!(Instant::now() < deadline, "limit not in force: {g:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = agent.cli(&["power", "set", "--gpu", "1", "--watts", "5000"])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GPU 1"), "{err}");

    let out = agent.cli(&["power", "restore", "--gpu", "1"])?;
    assert!(out.status.success());
    agent.status_until(Duration::from_secs(5), |s| {
        s.gpus[1].sample.as_ref().is_some_and(|x| x.power_limit_mw == 700_000)
    })?;
    Ok(())
}

impl Agent {
    /// Collect every notification read so far.
    fn drain(&mut self) {
        self.notices.extend(self.notify.try_iter());
    }

    fn power(&self) -> Result<PowerReport, Box<dyn std::error::Error>> {
        self.json(&["power", "--json"])
    }

    /// Poll the power report every 50 ms until `ready` accepts it (`Err` says what is not there
    /// yet, and is the error once `within` has passed).
    fn power_until(
        &mut self,
        within: Duration,
        ready: impl Fn(&PowerReport) -> Result<(), String>,
    ) -> Result<PowerReport, Box<dyn std::error::Error>> {
        let t0 = Instant::now();
        loop {
            self.drain();
            let p = self.power()?;
            match ready(&p) {
                Ok(()) => return Ok(p),
                Err(why) if t0.elapsed() > within => {
                    return Err(format!("{why} after {within:?}: {p:?}").into());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Poll the power report until every GPU's limit in force sums to at most `watts`.
    fn limits_at_most(
        &mut self,
        watts: u32,
        within: Duration,
    ) -> Result<PowerReport, Box<dyn std::error::Error>> {
        self.power_until(within, |p| {
            let sum: u32 = p.gpus.iter().filter_map(|g| g.limit_mw).sum();
            // Every GPU must be sampled with a limit in force (an empty report is not "under").
            let complete = !p.gpus.is_empty() && p.gpus.iter().all(|g| g.limit_mw.is_some());
            if complete && sum <= watts * 1000 {
                Ok(())
            } else {
                Err(format!("limits {sum} mW not under {watts} W"))
            }
        })
    }

    /// Poll the power report until the controller's budget setting is `watts`.
    fn budget_is(
        &mut self,
        watts: Option<u32>,
        within: Duration,
    ) -> Result<PowerReport, Box<dyn std::error::Error>> {
        self.power_until(within, |p| {
            let now = p.control.as_ref().map(|c| c.settings.budget_w);
            if now == Some(watts) { Ok(()) } else { Err(format!("budget {now:?}, not {watts:?}")) }
        })
    }

    fn hup(&self) {
        let pid = i32::try_from(self.child.id()).unwrap_or(0);
        // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(rc, 0);
    }
}

/// The budget changes at runtime through the CLI and through SIGHUP and takes effect within
/// 2 s (limits in force; asserted with 1 s of slack for a loaded machine); an invalid file on
/// SIGHUP is refused and the running settings stay; `power` shows budget, caps and reasons.
#[test]
fn power_budget_changes_by_cli_and_sighup_and_a_bad_reload_is_refused() -> TestResult {
    let config = "[gpu]\nbackend = \"sim\"\nsample_interval_ms = 200\n[sim]\ngpus = 4\n\
                  [power]\nbudget_w = 2400\n";
    let mut agent = Agent::start(config)?;
    assert!(agent.wait_notice(|n| n.contains("READY=1"), Duration::from_secs(10)));
    agent.limits_at_most(2400, Duration::from_secs(10))?;

    let out = agent.cli(&["power", "budget", "1600"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.limits_at_most(1600, Duration::from_secs(3))?;
    // Idle GPUs may already be capped under 1600 W in total: wait for the setting itself too.
    let p = agent.budget_is(Some(1600), Duration::from_secs(3))?;
    let control = p.control.ok_or("no control in the report")?;
    assert_eq!(control.settings.budget_w, Some(1600));
    assert!(p.gpus.iter().all(|g| g.cap_w.is_some() && g.reason.is_some()), "{:?}", p.gpus);
    let text = agent.cli(&["power"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("budget 1600 W"), "{text}");

    let bad = agent.cli(&["power", "budget", "0"])?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("budget_w"));

    // SIGHUP with a new budget in the file.
    let file = agent.dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&file)?.replace("budget_w = 2400", "budget_w = 1200");
    std::fs::write(&file, &text)?;
    agent.hup();
    agent.limits_at_most(1200, Duration::from_secs(3))?;

    // An invalid file: refused, the running budget stays, the agent keeps serving.
    std::fs::write(&file, text.replace("budget_w = 1200", "budget_w = -5"))?;
    agent.hup();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(100));
        agent.drain();
    }
    let p = agent.power()?;
    assert_eq!(p.control.map(|c| c.settings.budget_w), Some(Some(1200)));
    Ok(())
}

#[test]
fn bad_config_exits_2_naming_file_and_key_and_starts_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.toml");
    let socket = dir.path().join("agent.sock");
    std::fs::write(
        &config,
        format!(
            "[api]\nsocket = {:?}\n[gpu]\nbackend = \"sim\"\nsampel_interval_ms = 10\n",
            socket
        ),
    )?;
    let out = Command::new(BIN).arg("run").arg("--config").arg(&config).output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("gpu.sampel_interval_ms"), "{err}");
    assert!(!socket.exists());

    let out = Command::new(BIN).arg("check-config").arg("--config").arg(&config).output()?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[test]
fn missing_nvml_library_keeps_the_agent_up_and_says_why() -> TestResult {
    let mut agent = Agent::start(
        "[gpu]\nbackend = \"nvml\"\nnvml_library = \"/nonexistent/libnvidia-ml.so.1\"\n",
    )?;
    assert!(agent.wait_notice(|n| n.contains("READY=1"), Duration::from_secs(10)));
    let status = agent.status_until(Duration::from_secs(10), |s| {
        s.subsystems.iter().any(|x| x.name == "gpu-sampler" && x.state == SubsystemState::Failed)
    })?;
    assert_eq!(status.state, NodeState::Degraded);
    let sampler = status.subsystems.iter().find(|x| x.name == "gpu-sampler").ok_or("no sampler")?;
    let err = sampler.last_error.as_deref().unwrap_or_default();
    assert!(err.contains("/nonexistent/libnvidia-ml.so.1"), "{err}");
    assert!(err.contains("gpu.backend = \"sim\""), "{err}");
    // The API still answers, and the text view shows the failure.
    let out = agent.cli(&["status"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("gpu-sampler FAILED"));
    Ok(())
}

#[test]
fn a_second_agent_does_not_steal_the_socket() -> TestResult {
    let mut first = Agent::start(SIM)?;
    assert!(first.wait_notice(|n| n.contains("READY=1"), Duration::from_secs(10)));
    first.status_until(Duration::from_secs(10), |s| s.state == NodeState::Ready)?;
    // Same socket path for the second one.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nsocket = {:?}\n[state]\ndir = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{SIM}",
            first.socket().display().to_string(),
            dir.path().join("state").display().to_string()
        ),
    )?;
    let mut second = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let _ = second.kill();
    let out = second.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The first still answers on its socket.
    assert_eq!(first.status()?.gpus.len(), 8);
    Ok(())
}

#[test]
fn client_without_agent_says_where_it_looked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("none.sock");
    let out = Command::new(BIN).arg("status").arg("--socket").arg(&socket).output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&socket.display().to_string()) && err.contains("is hearth-agent running"));
    Ok(())
}
