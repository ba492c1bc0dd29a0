//! The supervisor: runs each subsystem as a task, restarts a failed one with backoff, and
//! publishes every subsystem's state on a `watch` channel.
//!
//! A subsystem is an async job that runs until cancelled. It reports "ready" through its
//! [`RunCtx`]; returning an error (or panicking, or returning early) is a failure: the failure
//! is recorded (`last_error`, `restarts`), and the subsystem is started again after a backoff
//! of 1 s doubling to 60 s, reset once it has run for [`STABLE_AFTER`]. One failure never stops
//! the agent or the other subsystems.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::api::{SubsystemState, SubsystemStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A boxed subsystem future.
pub type BoxRun = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A long-running part of the agent.
pub trait Subsystem: Send + Sync + 'static {
    /// Stable name, shown in status (`gpu-sampler`).
    fn name(&self) -> &'static str;
    /// Run until `ctx.cancel` fires. Call `ctx.ready()` once serving.
    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun;
}

/// What a running subsystem gets.
#[derive(Debug, Clone)]
pub struct RunCtx {
    /// Fires at shutdown; the subsystem returns `Ok(())` soon after.
    pub cancel: CancellationToken,
    index: usize,
    status: Arc<watch::Sender<Vec<SubsystemStatus>>>,
}

impl RunCtx {
    /// Mark the subsystem running (ready).
    pub fn ready(&self) {
        self.status.send_modify(|all| {
            if let Some(s) = all.get_mut(self.index) {
                s.state = SubsystemState::Running;
            }
        });
    }
}

/// Backoff before the first restart.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A run this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Handle to the running supervisor.
#[derive(Debug)]
pub struct Supervisor {
    status: Arc<watch::Sender<Vec<SubsystemStatus>>>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Supervisor {
    /// Start every subsystem, each in its own task.
    pub fn start(subsystems: Vec<Arc<dyn Subsystem>>, backoff_start: Duration) -> Self {
        let initial = subsystems
            .iter()
            .map(|s| SubsystemStatus {
                name: s.name().to_string(),
                state: SubsystemState::Starting,
                restarts: 0,
                last_error: None,
            })
            .collect();
        let status = Arc::new(watch::Sender::new(initial));
        let cancel = CancellationToken::new();
        let tasks = subsystems
            .into_iter()
            .enumerate()
            .map(|(index, sub)| {
                let ctx = RunCtx { cancel: cancel.clone(), index, status: status.clone() };
                tokio::spawn(supervise(sub, ctx, backoff_start))
            })
            .collect();
        Self { status, cancel, tasks }
    }

    /// Subsystem states, updated on every change.
    pub fn status(&self) -> watch::Receiver<Vec<SubsystemStatus>> {
        self.status.subscribe()
    }

    /// Cancel every subsystem and wait up to `grace` for them to stop; tasks still running
    /// then are aborted. Returns the names of those that had to be aborted.
    pub async fn shutdown(self, grace: Duration) -> Vec<String> {
        self.cancel.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let mut aborted = Vec::new();
        let names: Vec<String> = self.status.borrow().iter().map(|s| s.name.clone()).collect();
        for (task, name) in self.tasks.into_iter().zip(names) {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
                aborted.push(name);
            }
        }
        aborted
    }
}

async fn supervise(sub: Arc<dyn Subsystem>, ctx: RunCtx, backoff_start: Duration) {
    let name = sub.name();
    let mut backoff = backoff_start;
    loop {
        set_state(&ctx, SubsystemState::Starting, None);
        let started = Instant::now();
        let task = tokio::spawn(sub.clone().run(ctx.clone()));
        // If this supervising task is aborted (shutdown grace exceeded), abort the run too.
        let _abort_on_drop = AbortOnDrop(task.abort_handle());
        let result = task.await;
        if ctx.cancel.is_cancelled() {
            set_state(&ctx, SubsystemState::Stopped, None);
            return;
        }
        let error = match result {
            Ok(Ok(())) => "stopped unexpectedly".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(join) if join.is_panic() => format!("panicked: {}", panic_message(join)),
            Err(_) => "task was cancelled".to_string(),
        };
        if started.elapsed() >= STABLE_AFTER {
            backoff = backoff_start;
        }
        tracing::error!(subsystem = name, error = %error, retry_in_ms = backoff.as_millis() as u64,
            "subsystem failed; restarting after backoff");
        ctx.status.send_modify(|all| {
            if let Some(s) = all.get_mut(ctx.index) {
                s.state = SubsystemState::Failed;
                s.restarts += 1;
                s.last_error = Some(error.clone());
            }
        });
        tokio::select! {
            () = ctx.cancel.cancelled() => {
                set_state(&ctx, SubsystemState::Stopped, None);
                return;
            }
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn set_state(ctx: &RunCtx, state: SubsystemState, error: Option<String>) {
    ctx.status.send_modify(|all| {
        if let Some(s) = all.get_mut(ctx.index) {
            s.state = state;
            if error.is_some() {
                s.last_error = error;
            }
        }
    });
}

fn panic_message(join: tokio::task::JoinError) -> String {
    let payload = join.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Fails `fail_times` times (alternating error and panic), then serves until cancelled.
    struct Flaky {
        fail_times: u32,
        runs: AtomicU32,
    }

    impl Subsystem for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
            Box::pin(async move {
                let n = self.runs.fetch_add(1, Ordering::SeqCst);
                if n < self.fail_times {
                    if n % 2 == 1 {
                        panic!("boom {n}");
                    }
                    anyhow::bail!("failure {n}");
                }
                ctx.ready();
                ctx.cancel.cancelled().await;
                Ok(())
            })
        }
    }

    struct Steady;

    impl Subsystem for Steady {
        fn name(&self) -> &'static str {
            "steady"
        }
        fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
            Box::pin(async move {
                ctx.ready();
                ctx.cancel.cancelled().await;
                Ok(())
            })
        }
    }

    struct Stubborn;

    impl Subsystem for Stubborn {
        fn name(&self) -> &'static str {
            "stubborn"
        }
        fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
            Box::pin(async move {
                ctx.ready();
                // Ignores cancellation.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
        }
    }

    async fn wait_for(
        rx: &mut watch::Receiver<Vec<SubsystemStatus>>,
        f: impl Fn(&[SubsystemStatus]) -> bool,
    ) {
        let reached =
            tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|s| f(s))).await.is_ok();
        assert!(reached, "condition not reached: {:?}", *rx.borrow());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_panics_restart_with_backoff_and_show_in_status() {
        let flaky = Arc::new(Flaky { fail_times: 3, runs: AtomicU32::new(0) });
        let sup = Supervisor::start(vec![flaky.clone(), Arc::new(Steady)], BACKOFF_START);
        let mut rx = sup.status();
        let t0 = tokio::time::Instant::now();
        wait_for(&mut rx, |s| s[0].state == SubsystemState::Running).await;
        // Backoffs 1 s + 2 s + 4 s before the fourth run.
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_secs(7), "{waited:?}");
        assert!(waited < Duration::from_secs(8), "{waited:?}");
        let s = rx.borrow().clone();
        assert_eq!(s[0].restarts, 3);
        assert_eq!(s[0].last_error.as_deref(), Some("failure 2"));
        assert_eq!(s[1].state, SubsystemState::Running);
        assert_eq!(s[1].restarts, 0);
        assert!(sup.shutdown(Duration::from_secs(1)).await.is_empty());
        assert!(rx.borrow().iter().all(|s| s.state == SubsystemState::Stopped));
    }

    #[tokio::test(start_paused = true)]
    async fn panic_message_is_recorded() {
        let flaky = Arc::new(Flaky { fail_times: 2, runs: AtomicU32::new(0) });
        let sup = Supervisor::start(vec![flaky], BACKOFF_START);
        let mut rx = sup.status();
        wait_for(&mut rx, |s| s[0].restarts == 2).await;
        assert_eq!(rx.borrow()[0].last_error.as_deref(), Some("panicked: boom 1"));
        sup.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped() {
        let flaky = Arc::new(Flaky { fail_times: 10, runs: AtomicU32::new(0) });
        let sup = Supervisor::start(vec![flaky], BACKOFF_START);
        let mut rx = sup.status();
        let t0 = tokio::time::Instant::now();
        wait_for(&mut rx, |s| s[0].state == SubsystemState::Running).await;
        // 1+2+4+8+16+32+60+60+60+60 s.
        assert_eq!(t0.elapsed().as_secs(), 303);
        sup.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_aborts_a_subsystem_that_ignores_cancel() {
        let sup = Supervisor::start(vec![Arc::new(Steady), Arc::new(Stubborn)], BACKOFF_START);
        let mut rx = sup.status();
        wait_for(&mut rx, |s| s.iter().all(|s| s.state == SubsystemState::Running)).await;
        let aborted = sup.shutdown(Duration::from_secs(2)).await;
        assert_eq!(aborted, vec!["stubborn".to_string()]);
    }
}
