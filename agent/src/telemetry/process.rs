//! The agent's own resource use, for `hearth_agent_*` self-metrics: resident memory and CPU time
//! from `/proc/self` ([`ProcSelf`]); the fake of the same name is in `crate::fakes::process`.

/// What the process uses now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
}

/// Reads the agent's own resource use.
pub trait SelfUsage: Send + Sync + std::fmt::Debug {
    /// The use now; `None` when it cannot be read.
    fn usage(&self) -> Option<Usage>;
}

/// `/proc/self/statm` and `/proc/self/stat`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcSelf;

impl SelfUsage for ProcSelf {
    fn usage(&self) -> Option<Usage> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // SAFETY: sysconf has no preconditions; it only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // SAFETY: as above.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        parse(&statm, &stat, u64::try_from(page).ok()?, u64::try_from(tick).ok()?)
    }
}

/// Parse `statm` (pages) and `stat` (utime and stime in clock ticks, fields 14 and 15).
pub fn parse(statm: &str, stat: &str, page_bytes: u64, ticks_per_s: u64) -> Option<Usage> {
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': field 3 is the state; utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    if ticks_per_s == 0 {
        return None;
    }
    Some(Usage {
        rss_bytes: rss_pages.saturating_mul(page_bytes),
        cpu_seconds: (utime + stime) as f64 / ticks_per_s as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_statm_and_stat_with_spaces_in_the_name() {
        let stat = "1234 (hearth agent) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        let u = parse("5000 300 100 1 0 200 0", stat, 4096, 100).expect("parses");
        assert_eq!(u.rss_bytes, 300 * 4096);
        assert!((u.cpu_seconds - 3.0).abs() < 1e-9, "{u:?}");
        assert_eq!(parse("garbage", stat, 4096, 100), None);
        assert_eq!(parse("1 2", "no paren", 4096, 100), None);
    }

    #[test]
    fn reads_this_process() {
        let u = ProcSelf.usage().expect("/proc/self is readable");
        assert!(u.rss_bytes > 0);
    }
}
