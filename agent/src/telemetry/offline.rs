//! Offline summaries (`docs/0007-telemetry.md`): while the control session is down, the
//! `summaries` subsystem closes a [`Summary`] every [`INTERVAL`] (per GPU: mean and peak
//! temperature and power, mean utilisation) and hands it to the [`Spool`]:
//!
//! - a bounded ring in memory (`heapless::Deque` of [`WINDOW`] = 360 entries: one hour); when it
//!   is full the oldest summary goes (it is outside the window);
//! - an append-only file under the state directory (`summaries.bin`), one record per summary
//!   (`len u32 LE, crc32 u32 LE, postcard bytes`), written and fsynced as the summary closes,
//!   so a crash or power cut loses at most the summary being written (a torn or corrupt tail
//!   record is dropped at load and the file rewritten).
//!
//! On reconnect the `fleet` subsystem uploads the pending summaries (`ControlMessage::Summaries`,
//! 60 a batch) and forgets them once the fleet acks (`SummariesAck { seq }`): the file is then
//! rewritten atomically (`persist::write_atomic`) with what is still pending. Sequence numbers
//! survive restarts (the file header carries the next one), so the fleet stores each once.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::control::{GpuSummary, Summary};

use crate::agent::{Agent, GpuSnapshot, now_ms};
use crate::supervisor::{BoxRun, RunCtx, Subsystem};

/// Length of one summary interval.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Summaries kept: one hour of 10 s intervals.
pub const WINDOW: usize = 360;
/// Summaries per upload message.
pub const BATCH: usize = 60;
/// File name under the state directory.
pub const FILE: &str = "summaries.bin";
/// The file's magic, first 8 bytes; the next 8 are the next sequence number (LE).
pub const MAGIC: &[u8; 8] = b"HSUMMRY1";
/// Largest record payload accepted (a summary of 64 GPUs is far smaller).
pub const MAX_RECORD: usize = 64 * 1024;

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// Reading or writing the file failed.
    #[error("cannot {step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a summary spool (wrong magic): left alone.
    #[error("{path} is not a summary file (bad magic); move it away to start afresh")]
    NotASpool {
        /// The file.
        path: PathBuf,
    },
    /// Encoding a summary failed.
    #[error("cannot encode summary {seq}")]
    Encode {
        /// Its sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: postcard::Error,
    },
}

/// What a spool file holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The next sequence number from the header.
    pub next_seq: u64,
    /// Whole, checksummed records, in file order.
    pub summaries: Vec<Summary>,
    /// Bytes of the file that parsed (header and whole records); less than the file's length
    /// when the tail is torn or corrupt.
    pub valid_len: usize,
}

/// Why bytes are not a spool file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The magic is wrong.
    #[error("bad magic")]
    BadMagic,
}

/// Parse a spool file. An empty or header-only file is an empty spool; records are read until
/// the first torn, oversized or corrupt one (the rest is the crash's tail and is dropped).
pub fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    if bytes.is_empty() {
        return Ok(Parsed { next_seq: 1, ..Parsed::default() });
    }
    let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
        // A header torn at creation.
        return if MAGIC.starts_with(bytes) {
            Ok(Parsed { next_seq: 1, ..Parsed::default() })
        } else {
            Err(ParseError::BadMagic)
        };
    };
    if magic != MAGIC {
        return Err(ParseError::BadMagic);
    }
    let Some((seq, mut rest)) = rest.split_first_chunk::<8>() else {
        return Ok(Parsed { next_seq: 1, ..Parsed::default() });
    };
    let mut out = Parsed { next_seq: u64::from_le_bytes(*seq).max(1), ..Parsed::default() };
    out.valid_len = 16;
    while let Some((head, body)) = rest.split_first_chunk::<8>() {
        let (len, crc) = head.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if len > MAX_RECORD || body.len() < len {
            break;
        }
        let payload = &body[..len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(s) = postcard::from_bytes::<Summary>(payload) else { break };
        out.next_seq = out.next_seq.max(s.seq + 1);
        out.summaries.push(s);
        out.valid_len += 8 + len;
        rest = &body[len..];
    }
    Ok(out)
}

fn record(s: &Summary) -> Result<Vec<u8>, OfflineError> {
    let payload =
        postcard::to_stdvec(s).map_err(|source| OfflineError::Encode { seq: s.seq, source })?;
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The bounded ring of pending summaries and its file.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    ring: heapless::Deque<Summary, WINDOW>,
    next_seq: u64,
    appended: usize,
}

impl Spool {
    /// Open (or create) the spool at `path`, keeping the newest [`WINDOW`] whole records; a torn
    /// tail is dropped and the file rewritten.
    pub fn open(path: &Path) -> Result<Self, OfflineError> {
        let io = |step| {
            let path = path.to_path_buf();
            move |source| OfflineError::Io { step, path, source }
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("read")(e)),
        };
        let parsed =
            parse(&bytes).map_err(|_| OfflineError::NotASpool { path: path.to_path_buf() })?;
        let mut spool = Self {
            path: path.to_path_buf(),
            ring: heapless::Deque::new(),
            next_seq: parsed.next_seq,
            appended: 0,
        };
        let whole = parsed.valid_len == bytes.len() && !bytes.is_empty();
        if parsed.valid_len < bytes.len() {
            tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() - parsed.valid_len,
                "summary file had a torn tail (crash or power cut while writing): dropped");
        }
        let records = parsed.summaries.len();
        for s in parsed.summaries {
            spool.keep(s);
        }
        spool.appended = records;
        if !whole {
            spool.rewrite()?;
        }
        Ok(spool)
    }

    fn keep(&mut self, s: Summary) {
        if self.ring.is_full() {
            self.ring.pop_front();
        }
        // Cannot fail: a slot was freed above.
        let _ = self.ring.push_back(s);
    }

    /// Rewrite the file with what is pending (atomic: temp, fsync, rename, fsync dir).
    fn rewrite(&mut self) -> Result<(), OfflineError> {
        let mut bytes = Vec::with_capacity(16 + self.ring.len() * 64);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.next_seq.to_le_bytes());
        for s in &self.ring {
            bytes.extend_from_slice(&record(s)?);
        }
        crate::persist::write_atomic(&self.path, &bytes).map_err(|e| OfflineError::Io {
            step: "write",
            path: self.path.clone(),
            source: std::io::Error::other(format!("{e:#}")),
        })?;
        self.appended = self.ring.len();
        Ok(())
    }

    /// Add a closed interval's summary (its `seq` is assigned here); append it to the file and
    /// fsync before returning. Returns its sequence number.
    pub fn push(&mut self, mut s: Summary) -> Result<u64, OfflineError> {
        s.seq = self.next_seq;
        self.next_seq += 1;
        let rec = record(&s)?;
        self.keep(s);
        // Compact once the file holds twice the window (the ring dropped what fell out).
        if self.appended >= 2 * WINDOW {
            self.rewrite()?;
            return Ok(self.next_seq - 1);
        }
        let io = |step| {
            let path = self.path.clone();
            move |source| OfflineError::Io { step, path, source }
        };
        let exists = self.path.exists();
        if !exists {
            self.rewrite()?;
            return Ok(self.next_seq - 1);
        }
        let mut f =
            std::fs::OpenOptions::new().append(true).open(&self.path).map_err(io("open"))?;
        f.write_all(&rec).map_err(io("append to"))?;
        f.sync_data().map_err(io("fsync"))?;
        self.appended += 1;
        Ok(self.next_seq - 1)
    }

    /// Up to `max` pending summaries, oldest first.
    pub fn pending(&self, max: usize) -> Vec<Summary> {
        self.ring.iter().take(max).cloned().collect()
    }

    /// Number of pending summaries.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The fleet stored every summary up to `seq`: forget them (the file is rewritten).
    pub fn ack(&mut self, seq: u64) -> Result<(), OfflineError> {
        let before = self.ring.len();
        while self.ring.front().is_some_and(|s| s.seq <= seq) {
            self.ring.pop_front();
        }
        if self.ring.len() != before {
            self.rewrite()?;
        }
        Ok(())
    }
}

/// Accumulates sampling rounds into one interval's [`Summary`].
#[derive(Debug, Default)]
pub struct Recorder {
    start_ms: Option<u64>,
    last_round: u64,
    gpus: Vec<Acc>,
}

#[derive(Debug, Default, Clone)]
struct Acc {
    index: u32,
    n: u32,
    temp_sum: u64,
    temp_max: u32,
    power_sum_mw: u64,
    power_max_mw: u32,
    util_sum: u64,
}

impl Recorder {
    /// Take in a snapshot (once per sampling round; a repeated round is ignored).
    pub fn observe(&mut self, snap: &GpuSnapshot, now_ms: u64) {
        if snap.rounds == self.last_round {
            return;
        }
        self.last_round = snap.rounds;
        self.start_ms.get_or_insert(now_ms);
        for g in &snap.gpus {
            let Some(s) = (if g.lost { None } else { g.sample.as_ref() }) else { continue };
            let i = g.inventory.index;
            let acc = match self.gpus.iter_mut().position(|a| a.index == i) {
                Some(p) => &mut self.gpus[p],
                None => {
                    self.gpus.push(Acc { index: i, ..Acc::default() });
                    let last = self.gpus.len() - 1;
                    &mut self.gpus[last]
                }
            };
            acc.n += 1;
            acc.temp_sum += u64::from(s.temp_core_c);
            acc.temp_max = acc.temp_max.max(s.temp_core_c);
            acc.power_sum_mw += u64::from(s.power_avg_mw);
            acc.power_max_mw = acc.power_max_mw.max(s.power_avg_mw);
            acc.util_sum += u64::from(s.util_gpu_pct);
        }
    }

    /// Close the interval at `now_ms`: its summary (`None` when no round was seen), and start
    /// the next one.
    pub fn close(
        &mut self,
        now_ms: u64,
        state: Option<hearth_proto::api::NodeState>,
    ) -> Option<Summary> {
        let start_ms = self.start_ms.take()?;
        let mut gpus: Vec<GpuSummary> = self
            .gpus
            .drain(..)
            .filter(|a| a.n > 0)
            .map(|a| {
                let n = u64::from(a.n);
                GpuSummary {
                    index: a.index,
                    samples: a.n,
                    temp_avg_c: (a.temp_sum / n) as u32,
                    temp_max_c: a.temp_max,
                    power_avg_w: (a.power_sum_mw / n / 1000) as u32,
                    power_max_w: a.power_max_mw / 1000,
                    util_avg_pct: (a.util_sum / n) as u32,
                }
            })
            .collect();
        gpus.sort_by_key(|g| g.index);
        Some(Summary {
            seq: 0,
            start_ms,
            duration_ms: u32::try_from(now_ms.saturating_sub(start_ms)).unwrap_or(u32::MAX),
            state,
            gpus,
        })
    }
}

/// The `summaries` subsystem: opens the spool, follows the sampler, and closes a summary every
/// [`INTERVAL`] while the control session is down.
#[derive(Debug)]
pub struct Summaries {
    agent: Arc<Agent>,
}

impl Summaries {
    /// Over `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

/// The spool's path for `agent`.
pub fn spool_path(agent: &Agent) -> PathBuf {
    agent.config.state.dir.join(FILE)
}

impl Subsystem for Summaries {
    fn name(&self) -> &'static str {
        "summaries"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            let agent = self.agent.clone();
            crate::persist::ensure_dir(&agent.config.state.dir)?;
            let spool = match agent.offline_spool() {
                Some(s) => s,
                None => {
                    let path = spool_path(&agent);
                    let s = tokio::task::spawn_blocking(move || Spool::open(&path)).await??;
                    tracing::info!(pending = s.len(), "offline summaries loaded");
                    agent.set_offline_spool(s)
                }
            };
            ctx.ready();
            let mut rx = agent.gpus().subscribe();
            let mut recorder = Recorder::default();
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
            loop {
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    r = rx.changed() => {
                        if r.is_err() {
                            return Ok(());
                        }
                        let snap = rx.borrow_and_update().clone();
                        recorder.observe(&snap, now_ms());
                    }
                    _ = tick.tick() => {
                        let connected =
                            agent.link_stats.session_up.load(std::sync::atomic::Ordering::Relaxed);
                        let summary = recorder.close(now_ms(), Some(agent.status().state));
                        if let (false, Some(s)) = (connected, summary) {
                            let sp = spool.clone();
                            let seq = tokio::task::spawn_blocking(move || {
                                sp.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(s)
                            })
                            .await??;
                            tracing::debug!(seq, "offline summary recorded");
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use hearth_proto::api::NodeState;

    use super::*;

    fn summary(gpus: u32) -> Summary {
        Summary {
            seq: 0,
            start_ms: 1_790_000_000_000,
            duration_ms: 10_000,
            state: Some(NodeState::Ready),
            gpus: (0..gpus)
                .map(|i| GpuSummary {
                    index: i,
                    samples: 10,
                    temp_avg_c: 60 + i,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn summaries_survive_a_crash_and_a_torn_tail_loses_only_the_last() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE);
        let mut spool = Spool::open(&path)?;
        for _ in 0..5 {
            spool.push(summary(2))?;
        }
        // Crash: the spool is dropped with no shutdown step.
        drop(spool);
        let spool = Spool::open(&path)?;
        assert_eq!(spool.pending(100).iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        drop(spool);
        // Power cut in the middle of the sixth record.
        let mut spool = Spool::open(&path)?;
        spool.push(summary(2))?;
        drop(spool);
        let len = std::fs::metadata(&path)?.len();
        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
        f.set_len(len - 3)?;
        drop(f);
        let mut spool = Spool::open(&path)?;
        assert_eq!(spool.len(), 5, "only the torn record is lost");
        // The torn record's number is free again: it never reached the fleet.
        assert_eq!(spool.push(summary(1))?, 6);
        Ok(())
    }

    #[test]
    fn the_ring_keeps_the_newest_window_and_acks_forget_for_good() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE);
        let mut spool = Spool::open(&path)?;
        for _ in 0..(WINDOW + 40) {
            spool.push(summary(1))?;
        }
        assert_eq!(spool.len(), WINDOW);
        assert_eq!(spool.pending(1)[0].seq, 41, "the oldest 40 fell out of the window");
        drop(spool);
        let mut spool = Spool::open(&path)?;
        assert_eq!(spool.len(), WINDOW);
        assert_eq!(spool.pending(1)[0].seq, 41);
        spool.ack(100)?;
        assert_eq!(spool.pending(1)[0].seq, 101);
        spool.ack(u64::MAX)?;
        assert!(spool.is_empty());
        drop(spool);
        let mut spool = Spool::open(&path)?;
        assert!(spool.is_empty());
        assert_eq!(spool.push(summary(1))?, WINDOW as u64 + 41, "seq continues after acks");
        Ok(())
    }

    #[test]
    fn a_foreign_file_is_refused_and_left_alone() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE);
        std::fs::write(&path, b"not a spool at all")?;
        assert!(matches!(Spool::open(&path), Err(OfflineError::NotASpool { .. })));
        assert_eq!(std::fs::read(&path)?, b"not a spool at all");
        Ok(())
    }

    #[test]
    fn corrupt_records_end_the_file() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&9u64.to_le_bytes());
        let mut s = summary(1);
        s.seq = 9;
        let rec = record(&s).unwrap_or_default();
        bytes.extend_from_slice(&rec);
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        bytes.extend_from_slice(&bad);
        let p = parse(&bytes).unwrap_or_default();
        assert_eq!(p.summaries.len(), 1);
        assert_eq!(p.next_seq, 10);
        assert_eq!(p.valid_len, 16 + rec.len());
        assert_eq!(parse(b"HSUM").map(|p| p.summaries.len()), Ok(0));
        assert_eq!(parse(b"XXXXXXXXXXXXXXXXXXXX"), Err(ParseError::BadMagic));
    }

    #[test]
    fn recorder_summarises_an_interval_of_rounds() {
        use hearth_sim::{Scenario, SimClock, SimHost, Workload};

        use crate::gpu::GpuBackend;
        let host = Arc::new(SimHost::new(
            &Scenario::uniform("h100-sxm", 2, Workload::Training),
            SimClock::Manual,
        ));
        let b = crate::gpu::sim::SimBackend::new(host.clone());
        let mut rec = Recorder::default();
        let mut temps = [Vec::new(), Vec::new()];
        for round in 1..=10u64 {
            host.advance(Duration::from_secs(1));
            let gpus: Vec<crate::agent::GpuEntry> = crate::gpu::inventory_all(&b)
                .unwrap_or_default()
                .into_iter()
                .map(|inventory| crate::agent::GpuEntry {
                    sample: b.sample(inventory.index).ok(),
                    inventory,
                    sampled_at_ms: None,
                    lost: false,
                    error: None,
                })
                .collect();
            for g in &gpus {
                if let Some(s) = &g.sample {
                    temps[g.inventory.index as usize].push(s.temp_core_c);
                }
            }
            let snap = GpuSnapshot { driver: None, gpus, rounds: round };
            rec.observe(&snap, 1000 * round);
            rec.observe(&snap, 1000 * round); // the same round twice counts once
        }
        let s = rec.close(11_000, Some(NodeState::Ready)).expect("a summary");
        assert_eq!(s.start_ms, 1000);
        assert_eq!(s.duration_ms, 10_000);
        for g in &s.gpus {
            let t = &temps[g.index as usize];
            assert_eq!(g.samples, 10);
            assert_eq!(g.temp_max_c, *t.iter().max().unwrap_or(&0));
            assert_eq!(u64::from(g.temp_avg_c), t.iter().map(|v| u64::from(*v)).sum::<u64>() / 10);
            assert!(g.power_avg_w > 100, "{g:?}");
        }
        assert!(rec.close(12_000, None).is_none(), "no round, no summary");
    }
}
