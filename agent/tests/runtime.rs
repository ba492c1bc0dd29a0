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
