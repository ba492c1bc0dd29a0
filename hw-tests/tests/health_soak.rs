//! No false alarms: 24 h of simulated healthy training (manual clock, health rounds every 10 s,
//! then every second in the last hour) with
//! the simulator's telemetry noise, background single-bit ECC, PCIe-replay and NVLink-error
//! rates and a hot but legal inlet (36 °C: the dies run ~6 °C under T.Limit) yields no
//! non-healthy verdict on any GPU, while in the same run, in its last hour, each detector fires
//! on its own injected fault on one GPU (cleared, reset and released before the next).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure};
use hearth_agent::gpu::sim::SimBackend;
use hearth_agent::gpu::{GpuBackend, inventory_all};
use hearth_agent::health::{Monitor, observe_inventory, policy::Policy};
use hearth_proto::api::GpuVerdict;
use hearth_sim::{Fault, Scenario, SimClock, SimHost, Workload};

const SCENARIO: &str = r#"
seed = 24
ambient_c = 36.0

[background]
sbe_per_hour = 4.0
pcie_replay_per_hour = 6.0
nvlink_replay_per_hour = 2.0

[[gpu]]
profile = "h100-sxm"
count = 4
workload = "training"
"#;

/// The GPU faults are injected into (the others must stay healthy throughout).
const VICTIM: u32 = 3;

struct Run {
    host: Arc<SimHost>,
    backend: SimBackend,
    monitor: Monitor,
    inventory: Vec<hearth_proto::gpu::GpuInventory>,
    events: Box<dyn hearth_agent::gpu::EventSource>,
    now_ms: u64,
}

impl Run {
    /// One simulated second: events, then a sampling round.
    fn second(&mut self) -> anyhow::Result<()> {
        self.step(1)
    }

    /// `secs` simulated seconds, then events and a sampling round.
    fn step(&mut self, secs: u64) -> anyhow::Result<()> {
        self.host.advance(Duration::from_secs(secs));
        self.now_ms += secs * 1000;
        while let Some(e) = self.events.wait(Duration::ZERO)? {
            self.monitor.observe_event(&e, self.now_ms);
        }
        let obs = observe_inventory(&self.backend, &self.inventory);
        self.monitor.observe_round(&obs, self.now_ms);
        Ok(())
    }

    fn verdicts(&self) -> Vec<(u32, GpuVerdict, Vec<String>)> {
        self.monitor
            .view()
            .gpus
            .into_iter()
            .map(|g| (g.index, g.health.verdict, g.health.reasons))
            .collect()
    }

    fn bystanders_healthy(&self, at: &str) -> anyhow::Result<()> {
        for (i, v, r) in self.verdicts() {
            if i != VICTIM && v != GpuVerdict::Healthy {
                bail!("false alarm on GPU {i} at {at}: {v:?} {r:?}");
            }
        }
        Ok(())
    }
}

#[test]
fn a_day_of_healthy_training_raises_no_alarm_and_each_detector_fires() -> anyhow::Result<()> {
    let scenario = Scenario::parse(SCENARIO, std::path::Path::new("<soak>"))?;
    let host = Arc::new(SimHost::new(&scenario, SimClock::Manual));
    let backend = SimBackend::new(host.clone());
    let inventory = inventory_all(&backend)?;
    let events = backend.events()?;
    let mut run = Run {
        host: host.clone(),
        backend,
        monitor: Monitor::new(Policy::default(), None)?,
        inventory,
        events,
        now_ms: 1_800_000_000_000,
    };
    let healthy_s = std::env::var("SOAK_S").ok().and_then(|s| s.parse().ok()).unwrap_or(23 * 3600);
    let mut max_temp = 0;
    // Polled checks every 10 s through the healthy day (the agent polls every second; the rate
    // windows are a minute either way, so a count is never split), every second in the fault
    // hour.
    for s in (0..healthy_s).step_by(10) {
        run.step(10)?;
        if s % 60 == 0 {
            for (i, v, r) in run.verdicts() {
                ensure!(v == GpuVerdict::Healthy, "false alarm on GPU {i} at {s} s: {v:?} {r:?}");
            }
            max_temp = max_temp.max(run.backend.sample(0)?.temp_core_c);
        }
    }
    // Nothing fired, yet the background rates did count and the GPUs ran hot.
    let s = run.backend.sample(0)?;
    let ecc = s.ecc.map_or(0, |e| e.volatile_corrected);
    ensure!(healthy_s < 23 * 3600 || ecc >= 80, "background SBE count {ecc}");
    ensure!(
        healthy_s < 23 * 3600 || s.pcie.replay_counter >= 120,
        "background replays {}",
        s.pcie.replay_counter
    );
    ensure!((80..=84).contains(&max_temp), "dies peaked at {max_temp} °C");
    ensure!(run.monitor.view().history.is_empty(), "{:?}", run.monitor.view().history);

    // The last hour: each detector on its own fault, on the victim GPU.
    let faults: Vec<(&str, Fault)> = vec![
        ("xid", Fault::Xid { xid: 48 }),
        ("ecc_dbe", Fault::DoubleBitEcc),
        ("ecc_sbe_rate", Fault::SingleBitEccStorm { per_second: 50, duration_s: 10.0 }),
        ("row_remap", Fault::RowRemapPending),
        ("pcie_link", Fault::PcieDowntrain { generation: 4, width: 16 }),
        ("pcie_replay", Fault::PcieReplayStorm { per_second: 5, duration_s: 10.0 }),
        ("nvlink", Fault::NvlinkDown { link: 3 }),
        ("nvlink", Fault::NvlinkErrors { link: 5, per_second: 5, duration_s: 10.0 }),
        ("power", Fault::BmcPowerLimit { watts: 500 }),
        ("thermal", Fault::CoolingFailure { ambient_rise_c: 10.0 }),
        ("presence", Fault::FallenOffBus),
    ];
    for (check, fault) in faults {
        let injected_at = run.now_ms;
        host.lock().inject(VICTIM, fault.clone())?;
        let mut fired = None;
        for _ in 0..300 {
            run.second()?;
            let v = run.monitor.view();
            let g = &v.gpus[VICTIM as usize];
            if g.health.verdict != GpuVerdict::Healthy {
                fired = Some((run.now_ms - injected_at, g.health.reasons.clone()));
                break;
            }
        }
        let Some((after_ms, reasons)) = fired else { bail!("{check} did not fire on {fault:?}") };
        let expected = match check {
            "xid" => "XID 48",
            "ecc_dbe" => "double-bit ECC",
            "ecc_sbe_rate" => "corrected ECC errors within a minute",
            "row_remap" => "row remap pending",
            "pcie_link" => "PCIe link Gen4 x16",
            "pcie_replay" => "PCIe replays within a minute",
            "nvlink" if matches!(fault, Fault::NvlinkDown { .. }) => "XID 74",
            "nvlink" => "NVLink errors within a minute",
            "power" => "enforced power limit",
            "thermal" => "of HW slowdown",
            _ => "fallen off the bus",
        };
        ensure!(
            reasons.iter().any(|r| r.contains(expected)),
            "{check}: {fault:?} fired after {after_ms} ms with {reasons:?}, expected {expected:?}"
        );
        run.bystanders_healthy(check)?;
        if matches!(fault, Fault::FallenOffBus) {
            break;
        }
        // Repair: clear the fault, reset the GPU, let it cool, return it to service.
        host.lock().inject(VICTIM, Fault::Clear)?;
        host.lock().reset_gpu(VICTIM)?;
        for _ in 0..240 {
            run.second()?;
        }
        run.monitor.release(VICTIM, run.now_ms);
        run.second()?;
        let v = run.monitor.view();
        ensure!(
            v.gpus[VICTIM as usize].health.verdict == GpuVerdict::Healthy,
            "victim not healthy after repairing {check}: {:?}",
            v.gpus[VICTIM as usize]
        );
    }
    ensure!(host.lock().workload(0)? == Workload::Training);
    Ok(())
}
