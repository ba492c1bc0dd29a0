//! The runtime in process, with the fake systemd notifier.

use std::sync::Arc;
use std::time::Duration;

use hearth_agent::config::{BackendKind, Config};
use hearth_agent::fakes::systemd::SystemdNotifier;
use hearth_agent::systemd::Notice;
use hearth_proto::api::{NodeState, SubsystemState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_status_reach_the_notifier() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.api.socket = dir.path().join("agent.sock");
    config.state.dir = dir.path().join("state");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    config.gpu.sample_interval_ms = 100;
    config.sim.gpus = 2;
    let notifier = Arc::new(SystemdNotifier::with_watchdog(Some(Duration::from_millis(200))));
    let running = hearth_agent::start(config, notifier.clone())?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = running.agent().status();
        if status.state == NodeState::Ready {
            assert!(status.subsystems.iter().all(|s| s.state == SubsystemState::Running));
            assert_eq!(status.gpus.len(), 2);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(450)).await;
    let notices = notifier.notices();
    assert_eq!(notices.iter().filter(|n| **n == Notice::Ready).count(), 1, "{notices:?}");
    let pings = notices.iter().filter(|n| **n == Notice::Watchdog).count();
    assert!(pings >= 3, "{pings} watchdog pings in ~0.5 s at a 100 ms period: {notices:?}");
    assert!(
        notices.iter().any(|n| matches!(n, Notice::Status(s) if s.starts_with("ready; 2 GPUs"))),
        "{notices:?}"
    );
    running.stop().await;
    assert!(notifier.notices().contains(&Notice::Stopping));
    Ok(())
}

/// The `power` subsystem in process: a budget from the configuration is held, a runtime change
/// is persisted, stopping leaves safe static caps (budget / GPUs), and a restart restores the
/// runtime budget (NVML limits do not survive a reboot; the saved settings do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_budget_is_held_persisted_left_safe_at_stop_and_restored()
-> Result<(), Box<dyn std::error::Error>> {
    use hearth_proto::api::PowerMode;

    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.api.socket = dir.path().join("agent.sock");
    config.state.dir = dir.path().join("state");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    config.gpu.sample_interval_ms = 100;
    config.sim.gpus = 4;
    config.sim.time_scale = 4.0;
    config.power.budget_w = Some(2000);
    config.power.control_period_ms = 250;
    let notifier = Arc::new(SystemdNotifier::with_watchdog(None));
    let running = hearth_agent::start(config.clone(), notifier.clone())?;
    let agent = running.agent().clone();

    let wait = |what: &'static str, pred: &dyn Fn(&hearth_proto::api::PowerReport) -> bool| {
        let agent = agent.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let p = agent.power();
            if pred(&p) {
                return Ok::<_, String>(p);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{what} never happened: {p:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Held at budget `b`: the controller runs with `b` (a draw that merely dips into the band
    // under an older, higher budget does not count) and the draw sits just under it.
    let held = |b: u64| {
        move |p: &hearth_proto::api::PowerReport| {
            p.control.as_ref().is_some_and(|c| {
                c.mode == PowerMode::Budget && c.settings.budget_w.map(u64::from) == Some(b)
            }) && p.total_draw_mw <= b * 1020
                && p.total_draw_mw >= b * 850
        }
    };
    tokio::task::block_in_place(|| wait("2000 W held", &held(2000)))?;

    // A runtime change (as the API or the fleet makes it): held, and saved.
    agent.set_power_budget(Some(1600));
    let p = tokio::task::block_in_place(|| wait("1600 W held", &held(1600)))?;
    assert!(p.control.is_some_and(|c| c.generation >= 2), "saved as a new generation");

    let host = agent.sim.clone().ok_or("no sim host")?;
    running.stop().await;
    host.advance(Duration::from_secs(1));
    for g in 0..4 {
        let limit = host.lock().sample(g)?.power_limit_mw;
        assert_eq!(limit, 400_000, "GPU {g} left at 1600 W / 4");
    }

    // Restart with the same configuration and state directory: the runtime budget comes back.
    let running = hearth_agent::start(config, notifier)?;
    let agent = running.agent().clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(c) = agent.power().control {
            assert_eq!(c.settings.budget_w, Some(1600), "{c:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "power control never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
    Ok(())
}
