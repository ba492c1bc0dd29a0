//! The `gpu-sampler` subsystem: opens the GPU backend, reads driver facts and inventory, then
//! samples every GPU each `gpu.sample_interval_ms` and publishes a [`GpuSnapshot`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::agent::{Agent, GpuEntry, GpuSnapshot, now_ms};
use crate::config::BackendKind;
use crate::gpu::nvml::NvmlBackend;
use crate::gpu::sim::SimBackend;
use crate::gpu::{GpuBackend, GpuError, inventory_all};
use crate::supervisor::{BoxRun, RunCtx, Subsystem};

/// Samples the GPUs.
#[derive(Debug)]
pub struct Sampler {
    agent: Arc<Agent>,
}

impl Sampler {
    /// A sampler for `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

/// Open the configured backend (blocking: NVML loads a library).
pub fn open_backend(agent: &Agent) -> Result<Arc<dyn GpuBackend>, GpuError> {
    match agent.config.gpu.backend {
        BackendKind::Nvml => Ok(Arc::new(NvmlBackend::open(&agent.config.gpu.nvml_library)?)),
        BackendKind::Sim => match &agent.sim {
            Some(host) => Ok(Arc::new(SimBackend::new(host.clone()))),
            None => Err(GpuError::Call {
                gpu: u32::MAX,
                op: "open sim backend",
                source: "the agent was started without a simulated node".into(),
            }),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("GPU call thread failed")
}

fn sample_round(backend: &dyn GpuBackend, mut gpus: Vec<GpuEntry>) -> Vec<GpuEntry> {
    for g in &mut gpus {
        match backend.sample(g.inventory.index) {
            Ok(s) => {
                g.sample = Some(s);
                g.sampled_at_ms = Some(now_ms());
                g.lost = false;
                g.error = None;
            }
            Err(GpuError::GpuLost { .. }) => {
                g.lost = true;
                g.error = None;
            }
            Err(e) => {
                let text = format!("{:#}", anyhow::Error::from(e));
                if g.error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(gpu = g.inventory.index, error = %text, "GPU sample failed");
                }
                g.error = Some(text);
            }
        }
    }
    gpus
}

impl Subsystem for Sampler {
    fn name(&self) -> &'static str {
        "gpu-sampler"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            let agent = self.agent.clone();
            let backend = match agent.backend() {
                Some(b) => b,
                None => {
                    let a = agent.clone();
                    let b = blocking(move || open_backend(&a)).await??;
                    agent.set_backend(b.clone());
                    b
                }
            };
            let b = backend.clone();
            let (driver, inventory) = blocking(move || -> Result<_, GpuError> {
                Ok((b.driver()?, inventory_all(b.as_ref())?))
            })
            .await??;
            tracing::info!(
                backend = backend.kind(),
                driver = %driver.driver_version,
                cuda = %driver.cuda_version,
                gpus = inventory.len(),
                "GPU backend open"
            );
            for inv in &inventory {
                tracing::info!(gpu = inv.index, uuid = %inv.uuid, model = %inv.name,
                    bus = %inv.pci_bus_id, "GPU found");
            }
            let entries: Vec<GpuEntry> = inventory
                .into_iter()
                .map(|inventory| GpuEntry {
                    inventory,
                    sample: None,
                    sampled_at_ms: None,
                    lost: false,
                    error: None,
                })
                .collect();
            agent.gpus().send_modify(|s| {
                *s = GpuSnapshot { driver: Some(driver), gpus: entries, rounds: 0 };
            });
            ctx.ready();
            let period = Duration::from_millis(agent.config.gpu.sample_interval_ms);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                let b = backend.clone();
                let gpus = agent.gpus().borrow().gpus.clone();
                let gpus = blocking(move || sample_round(b.as_ref(), gpus)).await?;
                agent.gpus().send_modify(|s| {
                    s.gpus = gpus;
                    s.rounds += 1;
                });
            }
        })
    }
}
