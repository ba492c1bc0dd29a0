//! Group commit for enrollments: one writer thread takes every enrollment waiting in the queue
//! and runs them in one registry transaction ([`Registry::enroll_batch`]), so a burst of nodes
//! powering on together costs one durable commit per batch instead of one per node, and each
//! enrollment only four statements on its way (consume a token use, look the hardware up,
//! write the node, write the event). Nothing waits on a timer: while one batch commits, the
//! next one gathers. A refused enrollment changes nothing (its checks come before its writes);
//! a database error or a failed commit fails every enrollment of its batch, and each node
//! retries with its backoff.
//! Design: `docs/0005-fleet.md` (enrollment).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use tokio::sync::oneshot;

use crate::registry::{
    BatchItem, CertRecord, DbError, EnrollOutcome, Enrollment, Registry, RegistryError,
};

/// Enrollments run in one transaction at most.
pub const MAX_BATCH: usize = 128;

/// Enrollments waiting at most; beyond that a request is refused as busy (the node retries).
pub const QUEUE: usize = 4096;

/// Issues the certificate for a node id, inside the enrollment's transaction.
pub type Signer = Box<dyn FnMut(&str) -> Result<CertRecord, String> + Send>;

/// What an enrollment gives back: the node id and whether it is new.
pub type Outcome = EnrollOutcome;

struct Job {
    enrollment: Enrollment,
    sign: Signer,
    reply: oneshot::Sender<Outcome>,
}

/// Why an enrollment could not be queued or answered.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Too many enrollments waiting.
    #[error("{QUEUE} enrollments are waiting: try again")]
    Busy,
    /// The writer thread is gone (the fleet is stopping).
    #[error("the enrollment writer stopped")]
    Stopped,
}

/// The queue in front of the enrollment writer thread.
#[derive(Debug)]
pub struct EnrollQueue {
    tx: SyncSender<Job>,
}

impl EnrollQueue {
    /// Start the writer thread on `registry`; it ends when the queue is dropped.
    pub fn start(registry: Arc<Registry>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("enroll-writer".into())
            .spawn(move || writer(&registry, &rx))?;
        Ok(Self { tx })
    }

    /// Queue one enrollment and wait for its outcome.
    pub async fn enroll(
        &self,
        enrollment: Enrollment,
        sign: Signer,
    ) -> Result<Outcome, QueueError> {
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(Job { enrollment, sign, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(QueueError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(QueueError::Stopped),
        }
        answer.await.map_err(|_| QueueError::Stopped)
    }
}

fn writer(registry: &Registry, rx: &Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = {
            let mut batch: Vec<BatchItem<'_>> =
                jobs.iter_mut().map(|j| (&j.enrollment, &mut *j.sign as _)).collect();
            registry.enroll_batch(&mut batch, crate::now_ms())
        };
        tracing::debug!(
            enrollments = jobs.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "enrollment batch committed"
        );
        match result {
            Ok(outcomes) => {
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(error = %why, enrollments = jobs.len(), "enrollment batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(RegistryError::Db(DbError {
                        backend: registry.kind(),
                        what: "enrollment batch".into(),
                        source: why.clone().into(),
                    })));
                }
            }
        }
    }
}
