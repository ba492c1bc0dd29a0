//! Helpers shared by Hearth's benchmarks (`src/bin/*`): process sampling from `/proc` and
//! child processes that are killed when dropped. Each benchmark is listed in
//! `docs/benchmarks.md` with its command, what it compares and its goal.
//!
//! Modules: [`hist`] (a lock-free latency histogram) and [`fleet_scale`] (the fleet scale
//! benchmark's load generator; entry point [`fleet_scale::run`]).

pub mod fleet_scale;
pub mod hist;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use anyhow::Context as _;

/// CPU time and memory of one process, read from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// User + system CPU time so far.
    pub cpu: Duration,
    /// Peak resident set size so far (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// Current resident set size (`VmRSS`), bytes.
    pub rss: u64,
}

/// The GPU inventory a node with `gpus` simulated H100 SXM boards sends at enrollment, as the
/// agent's simulated backend reports it, so that enrollment benchmarks carry a real node's
/// request body and registry row rather than an empty list; [`node_gpu_inventory`] gives it one
/// node's GPU UUIDs and serials.
pub fn sim_gpu_inventory(gpus: u32) -> anyhow::Result<Vec<hearth_proto::gpu::GpuInventory>> {
    let host = std::sync::Arc::new(hearth_sim::SimHost::new(
        &hearth_sim::Scenario::uniform("h100-sxm", gpus, hearth_sim::Workload::Idle),
        hearth_sim::SimClock::Manual,
    ));
    let backend = hearth_agent::gpu::sim::SimBackend::new(host);
    Ok(hearth_agent::gpu::inventory_all(&backend)?)
}

/// `template` ([`sim_gpu_inventory`]) with node `node`'s GPU UUIDs and serials.
pub fn node_gpu_inventory(
    template: &[hearth_proto::gpu::GpuInventory],
    node: u64,
) -> Vec<hearth_proto::gpu::GpuInventory> {
    template
        .iter()
        .map(|g| hearth_proto::gpu::GpuInventory {
            uuid: node_gpu_uuid(node, g.index),
            serial: Some(format!("{node:08}{:04}", g.index)),
            ..g.clone()
        })
        .collect()
}

/// Node `node`'s GPU `index` UUID, as in its hardware identity.
pub fn node_gpu_uuid(node: u64, index: u32) -> String {
    format!("GPU-{node:08}-{index}")
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error, handled below.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Read one process's CPU time and memory.
pub fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat =
        std::fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `after` starts at field 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    let ticks = ticks_per_second();
    let cpu = Duration::from_micros((utime + stime) * 1_000_000 / ticks);
    let status_path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let kib = |key: &str| -> anyhow::Result<u64> {
        let line =
            status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key}"))?;
        let v: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(v * 1024)
    };
    Ok(ProcSample { cpu, peak_rss: kib("VmHWM:")?, rss: kib("VmRSS:")? })
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Guarded(pub Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Size of a file in bytes.
pub fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len())
}

/// Format bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() -> anyhow::Result<()> {
        let s = proc_sample(std::process::id())?;
        assert!(s.peak_rss >= s.rss && s.rss > 0);
        Ok(())
    }

    #[test]
    fn date_format() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }
}
