//! The `gpu-events` subsystem: a blocking thread waits on the backend's event source (an NVML
//! event set) and records each event in the agent's event log.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hearth_proto::gpu::GpuEventKind;

use crate::agent::Agent;
use crate::supervisor::{BoxRun, RunCtx, Subsystem};

/// How long one wait blocks before the thread looks at the cancel flag.
const WAIT: Duration = Duration::from_millis(250);

/// Forwards GPU events.
#[derive(Debug)]
pub struct Events {
    agent: Arc<Agent>,
}

impl Events {
    /// Events for `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

impl Subsystem for Events {
    fn name(&self) -> &'static str {
        "gpu-events"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            // Ready from the start: waiting for the backend (which the sampler opens) is this
            // subsystem's normal state, not a failure.
            ctx.ready();
            let mut rx = self.agent.gpus().subscribe();
            let backend = loop {
                if let Some(b) = self.agent.backend() {
                    break b;
                }
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    changed = rx.changed() => changed.context("GPU snapshot channel closed")?,
                }
            };
            let b = backend.clone();
            let mut source = tokio::task::spawn_blocking(move || b.events())
                .await
                .context("event thread failed")?
                .context("cannot open the GPU event source")?;
            let agent = self.agent.clone();
            let cancel = ctx.cancel.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                while !cancel.is_cancelled() {
                    let Some(event) = source.wait(WAIT).context("waiting for GPU events")? else {
                        continue;
                    };
                    match event.kind {
                        GpuEventKind::Xid(xid) => {
                            tracing::warn!(gpu = event.gpu, uuid = %event.uuid, xid, "XID error");
                        }
                        GpuEventKind::DoubleBitEcc => {
                            tracing::error!(gpu = event.gpu, uuid = %event.uuid, "double-bit ECC error");
                        }
                        GpuEventKind::SingleBitEcc => {
                            tracing::debug!(gpu = event.gpu, uuid = %event.uuid, "single-bit ECC error");
                        }
                    }
                    agent.record_event(event);
                }
                Ok(())
            })
            .await
            .context("event thread failed")?
        })
    }
}
