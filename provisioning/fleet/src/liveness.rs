//! The liveness writer: one thread, below the session tasks' CPU priority, that writes each
//! flush's last-seen rows ([`Registry::record_seen`]).
//!
//! At 50,000 sessions a flush every 5 s writes about 15,000 rows per gateway, tens of
//! milliseconds of CPU in one burst. Run at the sessions' priority on a busy core, that burst
//! took CPU from the tasks that ack heartbeats, and acks queued behind it: the heartbeat
//! latency tail at the goal size came from these bursts (`docs/fleet-scaling.md`, "Where the
//! latency tail came from"). This thread runs at nice [`NICE`], so the scheduler gives the
//! sessions the core first and the batch the time they leave; the batch still ends within its
//! flush while the core has any idle time, and `last_seen` stays durable well inside 30 s.
//! A failure to lower the priority (a seccomp filter, say) is logged and the writer runs on.
//! Design: `docs/0005-fleet.md` (liveness).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use tokio::sync::oneshot;

use crate::registry::{Registry, RegistryError, Seen};

/// The writer thread's nice value (the session tasks run at 0; 19 is the lowest priority). At
/// 10 the scheduler weighs the writer about 1 : 10 against each busy session thread.
pub const NICE: i32 = 10;

/// Batches waiting at most. The flush loop waits for each batch to be written before it makes
/// the next, so one is the most it ever queues; the bound is a guard.
const QUEUE: usize = 4;

struct Job {
    batch: Vec<Seen>,
    reply: oneshot::Sender<Result<(), RegistryError>>,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The registry refused or failed the write.
    #[error("writing {rows} liveness rows failed")]
    Registry {
        /// Rows in the batch.
        rows: usize,
        /// Why.
        #[source]
        source: RegistryError,
    },
    /// Batches are waiting already (the flush loop makes one at a time, so this is a bug).
    #[error("the liveness writer is busy")]
    Busy,
    /// The writer thread is gone (the fleet is stopping, or the thread panicked).
    #[error("the liveness writer stopped")]
    Stopped,
}

/// The queue in front of the liveness writer thread.
#[derive(Debug)]
pub struct LivenessWriter {
    tx: SyncSender<Job>,
}

impl LivenessWriter {
    /// Start the writer thread on `registry`; it ends when the writer is dropped.
    pub fn start(registry: Arc<Registry>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("liveness-writer".into())
            .spawn(move || writer(&registry, &rx))?;
        Ok(Self { tx })
    }

    /// Write one flush's rows and wait until they are durable.
    pub async fn write(&self, batch: Vec<Seen>) -> Result<(), WriteError> {
        let rows = batch.len();
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(Job { batch, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(WriteError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(WriteError::Stopped),
        }
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(WriteError::Registry { rows, source }),
            Err(_) => Err(WriteError::Stopped),
        }
    }
}

fn writer(registry: &Registry, rx: &Receiver<Job>) {
    if let Err(e) = crate::os::lower_thread_priority(NICE) {
        tracing::warn!(
            error = %e,
            nice = NICE,
            "cannot lower the liveness writer's priority: liveness batches compete with sessions"
        );
    }
    while let Ok(job) = rx.recv() {
        let _ = job.reply.send(registry.record_seen(&job.batch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::tests::nice_in;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn seen(id: &str, at: u64) -> Seen {
        Seen {
            node_id: id.into(),
            last_seen_ms: at,
            heartbeat: None,
            protocol_version: hearth_proto::control::PROTOCOL_VERSION,
            gateway: None,
        }
    }

    #[tokio::test]
    async fn a_batch_is_written_on_the_writer_thread_at_its_priority() -> TestResult {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite:{}", dir.path().join("r.db").display());
        let registry = Arc::new(Registry::open_url(&url)?);
        let writer = LivenessWriter::start(registry.clone())?;
        // No such node: the write succeeds and changes nothing (a node revoked mid-flush).
        let before = registry.dump()?;
        writer.write(vec![seen("n-unknown", 5)]).await?;
        writer.write(Vec::new()).await?;
        assert_eq!(registry.dump()?, before);
        // The thread's nice value, read back from /proc (the writer lowers only its own).
        let task = std::fs::read_dir("/proc/self/task")?
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "liveness-writer")
            })
            .ok_or("no liveness-writer thread")?;
        let own = nice_in(std::path::Path::new("/proc/thread-self"))?;
        assert_eq!(nice_in(&task.path())?, NICE.max(own), "the writer runs at NICE (or lower)");
        Ok(())
    }

    #[tokio::test]
    async fn a_stopped_writer_says_so() {
        let (tx, rx) = sync_channel(1);
        drop(rx);
        let writer = LivenessWriter { tx };
        assert!(matches!(writer.write(vec![seen("n", 1)]).await, Err(WriteError::Stopped)));
    }
}
