//! The node's exposition, built from the agent's current state at each scrape
//! (`docs/0007-telemetry.md`).
//!
//! GPU series carry dcgm-exporter's names, types, units and labels, so dashboards built on
//! dcgm-exporter fill unchanged: temperatures in °C, power in W, energy in mJ (a counter),
//! framebuffer in MiB, clocks in MHz, utilisation in %. `DCGM_FI_DEV_XID_ERRORS` is the last XID
//! (as in dcgm-exporter); the full history is `hearth_gpu_xid_errors_total{xid}`. A GPU that is
//! lost or not sampled yet has no GPU samples (its series go stale rather than lie).

use std::sync::Arc;

use hearth_proto::api::{GpuService, GpuVerdict, NodeState, PowerMode, SubsystemState};
use hearth_proto::exposition::{Exposition, Kind, Labels, Sample};

use crate::agent::Agent;
use crate::telemetry::LinkStats;
use crate::telemetry::process::SelfUsage;

const MIB: f64 = 1024.0 * 1024.0;

type LabelSet = Arc<Vec<(&'static str, String)>>;

fn snake(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

fn one(value: f64) -> Vec<Sample> {
    vec![Sample { labels: Labels::default(), value }]
}

fn own(labels: Vec<(&'static str, String)>, value: f64) -> Sample {
    Sample { labels: Labels::own(labels), value }
}

/// Build the node's exposition.
pub fn render(agent: &Agent, usage: &dyn SelfUsage) -> Exposition {
    let snap = agent.gpus().borrow().clone();
    let health = agent.health_watch().borrow().clone();
    let outcome = agent.power_outcome().borrow().clone();
    let (last_xid, xid_counts) = agent.xid_history();
    let driver = snap.driver.as_ref().map(|d| d.driver_version.clone());
    let mut e = Exposition::default();

    // Each GPU's label set, in dcgm-exporter's order, and its latest sample (None: lost or not
    // sampled yet).
    let sampled_at: Vec<Option<u64>> =
        snap.gpus.iter().map(|g| if g.lost { None } else { g.sampled_at_ms }).collect();
    let gpus: Vec<(u32, LabelSet, Option<&hearth_proto::gpu::GpuSample>, u64)> = snap
        .gpus
        .iter()
        .map(|g| {
            let inv = &g.inventory;
            let mut labels = vec![
                ("gpu", inv.index.to_string()),
                ("UUID", inv.uuid.clone()),
                ("pci_bus_id", inv.pci_bus_id.clone()),
                ("device", format!("nvidia{}", inv.index)),
                ("modelName", inv.name.clone()),
                ("Hostname", agent.hostname.clone()),
            ];
            if let Some(d) = &driver {
                labels.push(("DCGM_FI_DRIVER_VERSION", d.clone()));
            }
            let sample = if g.lost { None } else { g.sample.as_ref() };
            (inv.index, Arc::new(labels), sample, inv.memory_total_bytes)
        })
        .collect();

    type Field = fn(&hearth_proto::gpu::GpuSample, u64) -> Option<f64>;
    let dcgm: [(&'static str, &'static str, Kind, Field); 22] = [
        ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", Kind::Gauge, |s, _| {
            Some(f64::from(s.sm_clock_mhz))
        }),
        ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", Kind::Gauge, |s, _| {
            Some(f64::from(s.mem_clock_mhz))
        }),
        ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", Kind::Gauge, |s, _| {
            s.temp_memory_c.map(f64::from)
        }),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", Kind::Gauge, |s, _| {
            Some(f64::from(s.temp_core_c))
        }),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", Kind::Gauge, |s, _| {
            Some(f64::from(s.power_avg_mw) / 1000.0)
        }),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            Kind::DcgmCounter,
            |s, _| Some(s.energy_mj as f64),
        ),
        ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (in W).", Kind::Gauge, |s, _| {
            Some(f64::from(s.power_limit_mw) / 1000.0)
        }),
        (
            "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
            "Effective power limit that the driver enforces after taking into account all limiters (in W).",
            Kind::Gauge,
            |s, _| Some(f64::from(s.enforced_power_limit_mw) / 1000.0),
        ),
        (
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
            "Total number of PCIe retries.",
            Kind::DcgmCounter,
            |s, _| Some(s.pcie.replay_counter as f64),
        ),
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", Kind::Gauge, |s, _| {
            Some(f64::from(s.util_gpu_pct))
        }),
        ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", Kind::Gauge, |s, _| {
            Some(f64::from(s.util_mem_pct))
        }),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", Kind::Gauge, |s, total| {
            Some((total.saturating_sub(s.memory_used_bytes) as f64 / MIB).floor())
        }),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", Kind::Gauge, |s, _| {
            Some((s.memory_used_bytes as f64 / MIB).floor())
        }),
        (
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            "Total number of single-bit volatile ECC errors.",
            Kind::DcgmCounter,
            |s, _| s.ecc.map(|e| e.volatile_corrected as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "Total number of double-bit volatile ECC errors.",
            Kind::DcgmCounter,
            |s, _| s.ecc.map(|e| e.volatile_uncorrected as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            "Total number of single-bit persistent ECC errors.",
            Kind::DcgmCounter,
            |s, _| s.ecc.map(|e| e.aggregate_corrected as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
            "Total number of double-bit persistent ECC errors.",
            Kind::DcgmCounter,
            |s, _| s.ecc.map(|e| e.aggregate_uncorrected as f64),
        ),
        (
            "DCGM_FI_DEV_RETIRED_SBE",
            "Total number of retired pages due to single-bit errors.",
            Kind::DcgmCounter,
            |s, _| s.retired_pages.map(|r| f64::from(r.single_bit)),
        ),
        (
            "DCGM_FI_DEV_RETIRED_DBE",
            "Total number of retired pages due to double-bit errors.",
            Kind::DcgmCounter,
            |s, _| s.retired_pages.map(|r| f64::from(r.double_bit)),
        ),
        (
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for uncorrectable errors",
            Kind::DcgmCounter,
            |s, _| s.remapped_rows.map(|r| f64::from(r.uncorrectable)),
        ),
        (
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for correctable errors",
            Kind::DcgmCounter,
            |s, _| s.remapped_rows.map(|r| f64::from(r.correctable)),
        ),
        (
            "DCGM_FI_DEV_ROW_REMAP_FAILURE",
            "Whether remapping of rows has failed",
            Kind::Gauge,
            |s, _| s.remapped_rows.map(|r| if r.failed { 1.0 } else { 0.0 }),
        ),
    ];
    for (name, help, kind, field) in dcgm {
        let f = e.family(name, help, kind);
        for (_, labels, sample, total) in &gpus {
            if let Some(v) = sample.and_then(|s| field(s, *total)) {
                f.samples.push(Sample { labels: Labels::shared(labels), value: v });
            }
        }
    }
    let f = e.family(
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "Whether remapping of rows is pending",
        Kind::Gauge,
    );
    for (_, labels, sample, _) in &gpus {
        if let Some(r) = sample.and_then(|s| s.remapped_rows) {
            f.samples.push(Sample {
                labels: Labels::shared(labels),
                value: if r.pending { 1.0 } else { 0.0 },
            });
        }
    }
    let f =
        e.family("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", Kind::Gauge);
    for (index, labels, _, _) in &gpus {
        let v = last_xid.get(index).copied().unwrap_or(0);
        f.samples.push(Sample { labels: Labels::shared(labels), value: v as f64 });
    }

    // Hearth's GPU series.
    let f = e.family(
        "hearth_gpu_xid_errors",
        "XID errors received since the agent started, by XID.",
        Kind::Counter,
    );
    for (index, labels, _, _) in &gpus {
        for ((_, xid), n) in xid_counts.range((*index, 0)..=(*index, u64::MAX)) {
            f.samples.push(Sample {
                labels: Labels { shared: labels.clone(), own: vec![("xid", xid.to_string())] },
                value: *n as f64,
            });
        }
    }
    let f = e.family(
        "hearth_gpu_clocks_event_reasons",
        "Why clocks are below their maximum: NVML's clocks-event reason bit mask.",
        Kind::Gauge,
    );
    for (_, labels, sample, _) in &gpus {
        if let Some(s) = sample {
            f.samples.push(Sample { labels: Labels::shared(labels), value: s.throttle.0 as f64 });
        }
    }
    let f = e.family(
        "hearth_gpu_sample_timestamp_seconds",
        "When the GPU's values in this exposition were read (Unix time, s).",
        Kind::Gauge,
    );
    for ((_, labels, sample, _), at) in gpus.iter().zip(&sampled_at) {
        if let (Some(_), Some(at)) = (sample, at) {
            f.samples.push(Sample { labels: Labels::shared(labels), value: *at as f64 / 1000.0 });
        }
    }
    let verdicts = [GpuVerdict::Healthy, GpuVerdict::Degraded, GpuVerdict::Failed];
    let f = e.family(
        "hearth_gpu_health_verdict",
        "The health layer's verdict on the GPU: 1 for the current verdict, 0 for the others.",
        Kind::Gauge,
    );
    for (index, labels, _, _) in &gpus {
        if let Some(h) = health.gpus.iter().find(|h| h.index == *index) {
            for v in verdicts {
                f.samples.push(Sample {
                    labels: Labels { shared: labels.clone(), own: vec![("verdict", snake(&v))] },
                    value: if h.health.verdict == v { 1.0 } else { 0.0 },
                });
            }
        }
    }
    let services = [
        GpuService::Serving,
        GpuService::ResetPending,
        GpuService::Quarantined,
        GpuService::Rechecking,
        GpuService::Rma,
    ];
    let f = e.family(
        "hearth_gpu_service_state",
        "Where the GPU stands in the health layer: 1 for the current state, 0 for the others.",
        Kind::Gauge,
    );
    for (index, labels, _, _) in &gpus {
        if let Some(h) = health.gpus.iter().find(|h| h.index == *index) {
            for st in services {
                f.samples.push(Sample {
                    labels: Labels { shared: labels.clone(), own: vec![("state", snake(&st))] },
                    value: if h.service == st { 1.0 } else { 0.0 },
                });
            }
        }
    }
    let f = e.family(
        "hearth_gpu_power_cap_watts",
        "The power cap the power controller chose for the GPU (W).",
        Kind::Gauge,
    );
    if let Some(o) = &outcome {
        for (index, labels, _, _) in &gpus {
            if let Some(c) = o.gpus.iter().find(|c| c.index == *index) {
                f.samples.push(Sample {
                    labels: Labels {
                        shared: labels.clone(),
                        own: vec![("reason", snake(&c.reason))],
                    },
                    value: c.cap_w,
                });
            }
        }
    }

    // Node.
    let status_state = agent.status().state;
    let states = [
        NodeState::Starting,
        NodeState::Ready,
        NodeState::Degraded,
        NodeState::Draining,
        NodeState::Quarantined,
    ];
    e.family("hearth_node_state", "The node's state: 1 for the current one.", Kind::Gauge)
        .samples = states
        .iter()
        .map(|s| own(vec![("state", snake(s))], if *s == status_state { 1.0 } else { 0.0 }))
        .collect();
    e.family(
        "hearth_node_drained",
        "The node was asked to drain (1) or serves (0).",
        Kind::Gauge,
    )
    .samples = one(if health.drained { 1.0 } else { 0.0 });
    e.family(
        "hearth_node_reboot_requested",
        "The node asks the fleet for a reboot (a GPU reset is impossible or failed).",
        Kind::Gauge,
    )
    .samples = one(if health.reboot_requested.is_some() { 1.0 } else { 0.0 });
    e.family(
        "hearth_node_missing_gpus",
        "GPUs of the first-boot inventory the driver no longer lists.",
        Kind::Gauge,
    )
    .samples = one(health.missing_gpus.len() as f64);
    let f = e.family(
        "hearth_host_check_verdict",
        "Host checks (filesystems, EDAC, clock, fleet, driver): 1 for the current verdict.",
        Kind::Gauge,
    );
    for h in &health.host {
        for v in verdicts {
            f.samples.push(own(
                vec![("check", h.name.clone()), ("verdict", snake(&v))],
                if h.verdict == v { 1.0 } else { 0.0 },
            ));
        }
    }

    // Power control.
    let draw_w: f64 =
        gpus.iter().filter_map(|(_, _, s, _)| s.map(|s| f64::from(s.power_avg_mw) / 1000.0)).sum();
    e.family("hearth_power_draw_watts", "Sum of the GPUs' 1 s average draw (W).", Kind::Gauge)
        .samples = one(draw_w);
    if let Some(o) = &outcome {
        if let Some(b) = o.control.settings.budget_w {
            e.family("hearth_power_budget_watts", "The node power budget (W).", Kind::Gauge)
                .samples = one(f64::from(b));
        }
        e.family(
            "hearth_power_allocated_watts",
            "Sum of the caps the power controller hands out (W).",
            Kind::Gauge,
        )
        .samples = one(f64::from(o.control.allocated_w));
        e.family(
            "hearth_power_mode",
            "The power controller's mode: 1 for the current one.",
            Kind::Gauge,
        )
        .samples = [PowerMode::NoBudget, PowerMode::Budget, PowerMode::Failsafe]
            .iter()
            .map(|m| own(vec![("mode", snake(m))], if *m == o.control.mode { 1.0 } else { 0.0 }))
            .collect();
    }

    // Control session and tunnel.
    let st = &agent.link_stats;
    let flag = |b: &std::sync::atomic::AtomicBool| {
        if b.load(std::sync::atomic::Ordering::Relaxed) { 1.0 } else { 0.0 }
    };
    let counter = |c: &std::sync::atomic::AtomicU64| LinkStats::get(c) as f64;
    let reconnects = |c: &std::sync::atomic::AtomicU64| LinkStats::get(c).saturating_sub(1) as f64;
    e.family("hearth_fleet_session_up", "The control session to the fleet is open.", Kind::Gauge)
        .samples = one(flag(&st.session_up));
    e.family(
        "hearth_fleet_session_reconnects",
        "Control sessions opened after the first one.",
        Kind::Counter,
    )
    .samples = one(reconnects(&st.session_opens));
    e.family(
        "hearth_fleet_session_sent_bytes",
        "Control frame bytes sent to the fleet.",
        Kind::Counter,
    )
    .samples = one(counter(&st.session_bytes_sent));
    e.family(
        "hearth_fleet_session_received_bytes",
        "Control frame bytes received from the fleet.",
        Kind::Counter,
    )
    .samples = one(counter(&st.session_bytes_received));
    e.family("hearth_fleet_heartbeats_sent", "Heartbeats sent to the fleet.", Kind::Counter)
        .samples = one(counter(&st.heartbeats_sent));
    e.family("hearth_tunnel_up", "The tunnel connection to the fleet is up.", Kind::Gauge)
        .samples = one(flag(&st.tunnel_up));
    e.family(
        "hearth_tunnel_reconnects",
        "Tunnel connections after the first one.",
        Kind::Counter,
    )
    .samples = one(reconnects(&st.tunnel_connects));
    e.family("hearth_tunnel_streams", "Tunnel streams the fleet opened.", Kind::Counter).samples =
        one(counter(&st.tunnel_streams));
    e.family("hearth_tunnel_streams_active", "Tunnel streams open now.", Kind::Gauge).samples =
        one(counter(&st.tunnel_streams_active));
    e.family(
        "hearth_tunnel_received_bytes",
        "Bytes relayed from the fleet to the node's targets (counted as each stream ends).",
        Kind::Counter,
    )
    .samples = one(counter(&st.tunnel_bytes_in));
    e.family(
        "hearth_tunnel_sent_bytes",
        "Bytes relayed from the node's targets to the fleet (counted as each stream ends).",
        Kind::Counter,
    )
    .samples = one(counter(&st.tunnel_bytes_out));

    // Updates (`docs/0009-updates.md`): the persisted update state, read at each scrape.
    match crate::update::report::read_state(&agent.config.state.dir) {
        Ok(u) => {
            use crate::update::state::Phase;
            let phases = [
                Phase::Idle,
                Phase::Downloading,
                Phase::Writing,
                Phase::Installed,
                Phase::Rebooting,
                Phase::Trial,
                Phase::CheckFailed,
                Phase::Blessed,
                Phase::RolledBack,
                Phase::Failed,
            ];
            e.family(
                "hearth_update_phase",
                "Where the current (or last) update is: 1 for its phase.",
                Kind::Gauge,
            )
            .samples = phases
                .iter()
                .map(|p| {
                    own(
                        vec![("phase", p.as_str().to_string())],
                        if *p == u.phase { 1.0 } else { 0.0 },
                    )
                })
                .collect();
            e.family(
                "hearth_update_progress_bytes",
                "Bytes downloaded or written in the update's current phase.",
                Kind::Gauge,
            )
            .samples = one(u.bytes_done as f64);
            e.family(
                "hearth_update_size_bytes",
                "Bytes the update's current phase handles in all.",
                Kind::Gauge,
            )
            .samples = one(u.bytes_total as f64);
            if let Some(t) = &u.target {
                e.family(
                    "hearth_update_target_info",
                    "The release being (or last) installed (value 1).",
                    Kind::Gauge,
                )
                .samples = vec![own(
                    vec![("version", t.version.to_string()), ("channel", t.channel.clone())],
                    1.0,
                )];
            }
            if let Some(v) = &u.anti_rollback {
                e.family(
                    "hearth_update_anti_rollback_info",
                    "The lowest release version this node accepts: the last blessed one (value 1).",
                    Kind::Gauge,
                )
                .samples = vec![own(vec![("version", v.to_string())], 1.0)];
            }
            e.family(
                "hearth_update_state_readable",
                "The persisted update state could be read (1) or not (0).",
                Kind::Gauge,
            )
            .samples = one(1.0);
        }
        Err(err) => {
            tracing::debug!(error = %err, "update state unreadable for /metrics");
            e.family(
                "hearth_update_state_readable",
                "The persisted update state could be read (1) or not (0).",
                Kind::Gauge,
            )
            .samples = one(0.0);
        }
    }

    // The agent itself.
    e.family("hearth_agent_build_info", "The agent's version (value 1).", Kind::Gauge).samples =
        vec![own(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1.0)];
    e.family("hearth_agent_uptime_seconds", "Seconds since the agent started.", Kind::Gauge)
        .samples = one(agent.started.elapsed().as_secs_f64().floor());
    if let Some(u) = usage.usage() {
        e.family(
            "hearth_agent_resident_memory_bytes",
            "The agent's resident memory (bytes).",
            Kind::Gauge,
        )
        .samples = one(u.rss_bytes as f64);
        e.family(
            "hearth_agent_cpu_seconds",
            "User and system CPU time the agent used (s).",
            Kind::Counter,
        )
        .samples = one(u.cpu_seconds);
    }
    let subsystems = agent.subsystems();
    e.family(
        "hearth_agent_subsystem_up",
        "The subsystem is running (1) or not (0).",
        Kind::Gauge,
    )
    .samples = subsystems
        .iter()
        .map(|s| {
            own(
                vec![("subsystem", s.name.clone())],
                if s.state == SubsystemState::Running { 1.0 } else { 0.0 },
            )
        })
        .collect();
    e.family(
        "hearth_agent_subsystem_restarts",
        "Times the supervisor restarted the subsystem after a failure.",
        Kind::Counter,
    )
    .samples = subsystems
        .iter()
        .map(|s| own(vec![("subsystem", s.name.clone())], f64::from(s.restarts)))
        .collect();
    e
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use hearth_proto::exposition::{Format, parse_text};
    use hearth_proto::gpu::{GpuEvent, GpuEventKind};
    use hearth_sim::{Scenario, SimClock, SimHost, Workload};

    use super::*;
    use crate::agent::{GpuEntry, GpuSnapshot};
    use crate::config::{BackendKind, Config};
    use crate::fakes::process::ProcSelf as FakeProc;
    use crate::gpu::GpuBackend;
    use crate::gpu::sim::SimBackend;
    use crate::telemetry::process::Usage;

    type Parsed = Vec<(String, Vec<(String, String)>, f64)>;

    /// An agent over a manual-clock simulated node of `gpus` GPUs, one sampling round done.
    fn agent(gpus: u32) -> (Arc<Agent>, Arc<SimHost>, SimBackend) {
        let host = Arc::new(SimHost::new(
            &Scenario::uniform("h100-sxm", gpus, Workload::Training),
            SimClock::Manual,
        ));
        host.advance(Duration::from_secs(30));
        let mut config = Config::default();
        config.gpu.backend = BackendKind::Sim;
        let agent = Agent::new(config, Some(host.clone()), "node-a".into());
        let backend = SimBackend::new(host.clone());
        sample(&agent, &backend);
        (agent, host, backend)
    }

    fn sample(agent: &Agent, backend: &SimBackend) {
        let inv = crate::gpu::inventory_all(backend).expect("inventory");
        let gpus = inv
            .into_iter()
            .map(|inventory| GpuEntry {
                sample: Some(backend.sample(inventory.index).expect("sample")),
                inventory,
                sampled_at_ms: Some(1),
                lost: false,
                error: None,
            })
            .collect();
        agent.gpus().send_replace(GpuSnapshot {
            driver: Some(backend.driver().expect("driver")),
            gpus,
            rounds: 1,
        });
    }

    fn value(parsed: &Parsed, name: &str, gpu: u32, extra: &[(&str, &str)]) -> Option<f64> {
        parsed
            .iter()
            .find(|(n, labels, _)| {
                n == name
                    && labels.iter().any(|(k, v)| k == "gpu" && *v == gpu.to_string())
                    && extra.iter().all(|(k, v)| labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|(_, _, v)| *v)
    }

    fn scrape(agent: &Agent) -> Parsed {
        let usage = FakeProc(Some(Usage { rss_bytes: 50 << 20, cpu_seconds: 2.5 }));
        parse_text(&render(agent, &usage).text()).expect("the exposition parses")
    }

    #[test]
    fn gpu_series_carry_dcgm_names_labels_and_units_of_the_simulator_state() {
        let (agent, _host, _b) = agent(3);
        let parsed = scrape(&agent);
        let snap = agent.gpus().borrow().clone();
        for g in &snap.gpus {
            let s = g.sample.as_ref().expect("sampled");
            let i = g.inventory.index;
            let v = |name| value(&parsed, name, i, &[]).unwrap_or(f64::NAN);
            assert_eq!(v("DCGM_FI_DEV_GPU_TEMP"), f64::from(s.temp_core_c));
            assert_eq!(v("DCGM_FI_DEV_MEMORY_TEMP"), f64::from(s.temp_memory_c.unwrap_or(0)));
            assert_eq!(v("DCGM_FI_DEV_POWER_USAGE"), f64::from(s.power_avg_mw) / 1000.0);
            assert_eq!(v("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"), s.energy_mj as f64);
            assert_eq!(v("DCGM_FI_DEV_SM_CLOCK"), f64::from(s.sm_clock_mhz));
            assert_eq!(v("DCGM_FI_DEV_MEM_CLOCK"), f64::from(s.mem_clock_mhz));
            assert_eq!(v("DCGM_FI_DEV_GPU_UTIL"), f64::from(s.util_gpu_pct));
            assert_eq!(v("DCGM_FI_DEV_POWER_MGMT_LIMIT"), f64::from(s.power_limit_mw) / 1000.0);
            assert_eq!(v("DCGM_FI_DEV_PCIE_REPLAY_COUNTER"), s.pcie.replay_counter as f64);
            let used = (s.memory_used_bytes / (1 << 20)) as f64;
            let free = ((g.inventory.memory_total_bytes - s.memory_used_bytes) / (1 << 20)) as f64;
            assert_eq!(v("DCGM_FI_DEV_FB_USED"), used);
            assert_eq!(v("DCGM_FI_DEV_FB_FREE"), free);
            assert!(s.power_avg_mw > 100_000, "a training GPU draws power: {}", s.power_avg_mw);
            assert_eq!(v("DCGM_FI_DEV_XID_ERRORS"), 0.0);
            // dcgm-exporter's labels, in its order.
            let labels = &parsed
                .iter()
                .find(|(n, l, _)| n == "DCGM_FI_DEV_GPU_TEMP" && l[0].1 == i.to_string())
                .expect("series")
                .1;
            let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "gpu",
                    "UUID",
                    "pci_bus_id",
                    "device",
                    "modelName",
                    "Hostname",
                    "DCGM_FI_DRIVER_VERSION"
                ]
            );
            assert_eq!(labels[1].1, g.inventory.uuid);
            assert_eq!(labels[3].1, format!("nvidia{i}"));
            assert_eq!(labels[4].1, g.inventory.name);
            assert_eq!(labels[5].1, "node-a");
        }
        let only = |name: &str| parsed.iter().find(|(n, _, _)| n == name).map(|p| p.2);
        assert_eq!(only("hearth_agent_resident_memory_bytes"), Some((50u64 << 20) as f64));
        assert_eq!(only("hearth_agent_cpu_seconds_total"), Some(2.5));
        assert_eq!(only("hearth_fleet_session_up"), Some(0.0));
        let draw: f64 = snap
            .gpus
            .iter()
            .filter_map(|g| g.sample.as_ref())
            .map(|s| f64::from(s.power_avg_mw) / 1000.0)
            .sum();
        assert!((only("hearth_power_draw_watts").unwrap_or(0.0) - draw).abs() < 1e-6);
    }

    #[test]
    fn update_series_follow_the_persisted_update_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(SimHost::new(
            &Scenario::uniform("h100-sxm", 1, Workload::Training),
            SimClock::Manual,
        ));
        let mut config = Config::default();
        config.gpu.backend = BackendKind::Sim;
        config.state.dir = dir.path().to_path_buf();
        let agent = Agent::new(config, Some(host), "node-a".into());
        let find = |parsed: &Parsed, name: &str, label: Option<(&str, &str)>| {
            parsed
                .iter()
                .find(|(n, labels, _)| {
                    n == name
                        && label.is_none_or(|(k, v)| labels.iter().any(|(a, b)| a == k && b == v))
                })
                .map(|(_, _, v)| *v)
        };
        // No update yet: idle, readable.
        let p = scrape(&agent);
        assert_eq!(find(&p, "hearth_update_phase", Some(("phase", "idle"))), Some(1.0));
        assert_eq!(find(&p, "hearth_update_state_readable", None), Some(1.0));
        assert_eq!(find(&p, "hearth_update_target_info", None), None);

        let state = crate::update::state::UpdateState {
            phase: crate::update::state::Phase::Downloading,
            bytes_done: 1000,
            bytes_total: 4000,
            ..Default::default()
        };
        crate::persist::Store::new(dir.path().join("update.json")).save(1, &state).expect("save");
        let p = scrape(&agent);
        assert_eq!(find(&p, "hearth_update_phase", Some(("phase", "downloading"))), Some(1.0));
        assert_eq!(find(&p, "hearth_update_phase", Some(("phase", "idle"))), Some(0.0));
        assert_eq!(find(&p, "hearth_update_progress_bytes", None), Some(1000.0));
        assert_eq!(find(&p, "hearth_update_size_bytes", None), Some(4000.0));

        std::fs::write(dir.path().join("update.json"), b"{ not json").expect("write");
        let p = scrape(&agent);
        assert_eq!(find(&p, "hearth_update_state_readable", None), Some(0.0));
        assert_eq!(find(&p, "hearth_update_phase", None), None);
    }

    #[test]
    fn xid_gauge_is_the_last_xid_and_the_counter_keeps_every_one() {
        let (agent, _host, _b) = agent(2);
        let uuid = agent.gpus().borrow().gpus[1].inventory.uuid.clone();
        for xid in [79, 13, 13, 48] {
            agent.record_event(GpuEvent {
                gpu: 1,
                uuid: uuid.clone(),
                kind: GpuEventKind::Xid(xid),
            });
        }
        agent.record_event(GpuEvent { gpu: 1, uuid, kind: GpuEventKind::SingleBitEcc });
        let parsed = scrape(&agent);
        assert_eq!(value(&parsed, "DCGM_FI_DEV_XID_ERRORS", 1, &[]), Some(48.0));
        assert_eq!(value(&parsed, "DCGM_FI_DEV_XID_ERRORS", 0, &[]), Some(0.0));
        let xid = |x: &str| value(&parsed, "hearth_gpu_xid_errors_total", 1, &[("xid", x)]);
        assert_eq!(
            (xid("79"), xid("13"), xid("48"), xid("31")),
            (Some(1.0), Some(2.0), Some(1.0), None)
        );
        assert_eq!(value(&parsed, "hearth_gpu_xid_errors_total", 0, &[]), None);
    }

    #[test]
    fn a_lost_gpu_has_no_telemetry_samples_and_link_counters_show() {
        let (agent, _host, _b) = agent(2);
        agent.gpus().send_modify(|s| s.gpus[0].lost = true);
        LinkStats::add(&agent.link_stats.session_opens, 3);
        LinkStats::add(&agent.link_stats.tunnel_bytes_out, 1234);
        let parsed = scrape(&agent);
        assert_eq!(value(&parsed, "DCGM_FI_DEV_GPU_TEMP", 0, &[]), None);
        assert!(value(&parsed, "DCGM_FI_DEV_GPU_TEMP", 1, &[]).is_some());
        let only = |name: &str| parsed.iter().find(|(n, _, _)| n == name).map(|p| p.2);
        assert_eq!(only("hearth_fleet_session_reconnects_total"), Some(2.0));
        assert_eq!(only("hearth_tunnel_sent_bytes_total"), Some(1234.0));
    }

    /// `promtool check metrics` on both GPU profiles' expositions: no parse error, and lint
    /// findings only on dcgm-exporter's names (docs/0007-telemetry.md lists them). Runs when
    /// promtool is installed; under CI (`CI` set) a missing promtool fails the test.
    #[test]
    #[allow(clippy::print_stderr)] // a skipped check says so
    fn promtool_finds_no_parse_error_and_lints_only_dcgm_names() {
        let (agent, _host, _b) = agent(8);
        let uuid = agent.gpus().borrow().gpus[0].inventory.uuid.clone();
        agent.record_event(GpuEvent { gpu: 0, uuid, kind: GpuEventKind::Xid(79) });
        let text = render(&agent, &FakeProc(Some(Usage::default()))).encode(Format::Text);
        match crate::telemetry::promtool_check(&text) {
            Ok(findings) => {
                for line in &findings {
                    // dcgm-exporter's metric names (counters without `_total`), and its camelCase
                    // label names (`UUID`, `modelName`, `Hostname`), which Hearth's GPU series
                    // carry too so they join with the DCGM ones.
                    let dcgm_name = line.starts_with("DCGM_FI_DEV_");
                    let dcgm_labels = line
                        .ends_with("label names should be written in 'snake_case' not 'camelCase'");
                    assert!(dcgm_name || dcgm_labels, "lint finding on a Hearth name: {line}");
                }
                assert!(!findings.is_empty(), "the dcgm counters' names are expected findings");
            }
            Err(crate::telemetry::PromtoolError::Missing) if std::env::var_os("CI").is_none() => {
                eprintln!("promtool not installed: skipped (scripts/test installs it)");
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[cfg(test)]
mod dashboard {
    /// Every node series the Grafana dashboard (`docs/grafana-hearth.json`) queries exists in
    /// the node's exposition (fleet series are checked in `hearth-fleet`'s tests by name).
    #[test]
    fn dashboard_queries_name_series_the_node_exports() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-hearth.json");
        let text = std::fs::read_to_string(path).expect("the dashboard is in docs/");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
        let node_src = include_str!("node.rs");
        let mut checked = 0;
        for panel in dash["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    let series = word.strip_suffix("_total").unwrap_or(word);
                    if word.starts_with("DCGM_FI_DEV_")
                        || (word.starts_with("hearth_") && !word.starts_with("hearth_fleet_"))
                    {
                        assert!(
                            node_src.contains(&format!("\"{series}\"")),
                            "the dashboard queries {word}, which the node does not export"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 15, "only {checked} series checked");
    }
}
