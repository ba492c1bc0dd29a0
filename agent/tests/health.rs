//! The `health` subsystem in a running agent (sim backend, real clock): an event-driven fault
//! reaches a verdict within 1 s and quarantines that GPU alone; once its job ends the GPU is
//! reset and serves again; the state is persisted with a generation number; drain and undrain
//! through the API move the node state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_agent::api::Done;
use hearth_agent::api::client::Client;
use hearth_agent::config::{BackendKind, Config};
use hearth_agent::fakes::systemd::SystemdNotifier;
use hearth_agent::health::NodeHealth;
use hearth_proto::api::{GpuService, GpuVerdict, HealthReport, NodeState};
use hearth_sim::{Fault, Workload};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn until(
    agent: &hearth_agent::agent::Agent,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&NodeHealth) -> bool,
) -> Result<NodeHealth, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = agent.health_watch().borrow().clone();
        if pred(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} not reached within {timeout:?}: {v:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn gpu(v: &NodeHealth, i: usize) -> (GpuVerdict, GpuService) {
    v.gpus
        .get(i)
        .map_or((GpuVerdict::Healthy, GpuService::Serving), |g| (g.health.verdict, g.service))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_quarantines_one_gpu_which_is_reset_when_idle_and_serves_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.api.socket = dir.path().join("agent.sock");
    config.state.dir = dir.path().join("state");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    config.gpu.sample_interval_ms = 200;
    config.sim.gpus = 4;
    let running = hearth_agent::start(config, Arc::new(SystemdNotifier::default()))?;
    let agent = running.agent().clone();
    let sim = agent.sim.clone().ok_or("no sim")?;
    until(&agent, Duration::from_secs(10), "4 healthy GPUs", |v| {
        v.rounds > 1
            && v.gpus.len() == 4
            && v.gpus.iter().all(|g| g.health.verdict == GpuVerdict::Healthy)
    })
    .await?;

    let t0 = Instant::now();
    sim.lock().inject(1, Fault::DoubleBitEcc)?;
    let v = until(&agent, Duration::from_secs(1), "GPU 1 quarantined", |v| {
        gpu(v, 1) == (GpuVerdict::Failed, GpuService::Quarantined)
    })
    .await?;
    let latency = t0.elapsed();
    for i in [0, 2, 3] {
        assert_eq!(gpu(&v, i), (GpuVerdict::Healthy, GpuService::Serving), "GPU {i}");
    }
    assert_eq!(agent.status().state, NodeState::Degraded);
    // Still training: never reset while serving.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gpu(&agent.health_watch().borrow(), 1).1, GpuService::Quarantined);

    // The job ends: reset, clean re-check, back in service.
    sim.lock().set_workload(1, Workload::Idle)?;
    let v = until(&agent, Duration::from_secs(5), "GPU 1 back", |v| {
        gpu(v, 1) == (GpuVerdict::Healthy, GpuService::Serving)
    })
    .await?;
    let g1: Vec<_> = v.history.iter().filter(|c| c.subject == "gpu 1").collect();
    assert!(g1.first().is_some_and(|c| c.to == GpuVerdict::Failed), "{g1:?}");
    assert!(g1.last().is_some_and(|c| c.to == GpuVerdict::Healthy), "{g1:?}");
    assert!(v.generation >= 2, "state saved {} times", v.generation);
    let saved = std::fs::read_to_string(dir.path().join("state/health.json"))?;
    let doc: serde_json::Value = serde_json::from_str(&saved)?;
    assert_eq!(doc["generation"].as_u64(), Some(v.generation));
    let uuid = &v.gpus[1].uuid;
    assert_eq!(doc["state"]["gpus"][uuid]["faults"].as_u64(), Some(1), "{saved}");

    // Drain and undrain through the API.
    let client = Client::new(&agent.config.api.socket);
    let _: Done = client.post("/v1/health/drain", &serde_json::json!({})).await?;
    assert_eq!(agent.status().state, NodeState::Draining);
    let report: HealthReport = client.get("/v1/health").await?;
    assert!(report.drained && report.state == NodeState::Draining);
    for i in [0, 2, 3] {
        sim.lock().set_workload(i, Workload::Idle)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.status().state != NodeState::Quarantined {
        assert!(
            Instant::now() < deadline,
            "drained idle node not quarantined: {:?}",
            agent.status().state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: Done = client.post("/v1/health/undrain", &serde_json::json!({})).await?;
    assert_eq!(agent.status().state, NodeState::Ready);
    running.stop().await;
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    Ok(())
}
