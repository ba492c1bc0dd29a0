//! `hearthctl rollout create|status|pause|resume`: staged rollouts of a signed release to a
//! channel's nodes (`docs/0009-updates.md`, "Staged rollouts"). Creating, pausing and resuming
//! need an admin certificate; status a viewer one.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use hearth_proto::rollout::{CURRENT, LEFT, Rollout, RolloutCreate, WaveSpec, Window};

/// `hearthctl rollout ...`
#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Start rolling a release out to every node on a channel, wave by wave. A node whose
    /// heartbeats say it already runs the version is not told (`current`, a success of its wave);
    /// a node that joins the channel while the rollout runs or is paused is taken in (the open
    /// wave, or the last one while the canary is open); one that leaves before it finished is
    /// `left`, never told again, counted neither way.
    Create {
        /// The channel (nodes whose desired state names it).
        #[arg(long, default_value = "stable")]
        channel: String,
        /// The release version (signed into the channel's repository with `release sign`).
        #[arg(long)]
        version: String,
        /// Cumulative shares of the channel's nodes, percent, canary first, ending at 100.
        #[arg(long, default_value = "5,25,50,100")]
        waves: String,
        /// Failure threshold per wave, percent: one value for all or one per wave; a wave whose
        /// failed + rolled-back share is above it halts the rollout.
        #[arg(long, default_value = "0,10,10,10")]
        max_failure_pct: String,
        /// Maintenance window `KEY=VALUE@HH:MM-HH:MM` (UTC) for the nodes with that label
        /// (repeatable); nodes no window names update at any time.
        #[arg(long = "window")]
        windows: Vec<String>,
        /// Time a told node has to be blessed or fail before it counts as failed in its wave
        /// (`timed_out`), e.g. `90m`, `6h`, `2d` (default 6h).
        #[arg(long)]
        node_timeout: Option<String>,
    },
    /// Progress: every rollout, or one in detail (nodes per phase per wave, bytes, failures,
    /// nodes already current or that left the channel).
    Status {
        /// Rollout id.
        id: Option<u64>,
    },
    /// Stop telling nodes (those already told finish their update).
    Pause {
        /// Rollout id.
        id: u64,
    },
    /// Continue a paused rollout.
    Resume {
        /// Rollout id.
        id: u64,
    },
}

/// Parse `--waves` and `--max-failure-pct`.
pub fn parse_waves(waves: &str, failure: &str) -> anyhow::Result<Vec<WaveSpec>> {
    let nums = |what: &str, s: &str| -> anyhow::Result<Vec<u8>> {
        s.split(',')
            .map(|x| {
                x.trim().parse::<u8>().with_context(|| format!("{what}: {x:?} is not a percentage"))
            })
            .collect()
    };
    let until = nums("--waves", waves)?;
    let fail = nums("--max-failure-pct", failure)?;
    let fail = match fail.len() {
        1 => vec![fail[0]; until.len()],
        n if n == until.len() => fail,
        n => bail!(
            "--max-failure-pct has {n} values for {} waves (give 1 or one per wave)",
            until.len()
        ),
    };
    Ok(until
        .into_iter()
        .zip(fail)
        .map(|(until_pct, max_failure_pct)| WaveSpec { until_pct, max_failure_pct })
        .collect())
}

/// Parse `--window KEY=VALUE@HH:MM-HH:MM`.
pub fn parse_window(s: &str) -> anyhow::Result<Window> {
    let Some((label, span)) = s.split_once('@') else {
        bail!("--window {s:?} is not KEY=VALUE@HH:MM-HH:MM");
    };
    let Some((start, end)) = span.split_once('-') else {
        bail!("--window {s:?}: {span:?} is not HH:MM-HH:MM");
    };
    Ok(Window { label: label.into(), start: start.into(), end: end.into() })
}

/// Parse a duration `N[s|m|h|d]` (no unit: seconds) into seconds.
pub fn parse_duration_s(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    let n: u64 =
        num.parse().with_context(|| format!("{s:?} is not a duration like 90m, 6h or 2d"))?;
    n.checked_mul(mult).with_context(|| format!("{s:?} is too long"))
}

/// The create request from the arguments.
pub fn create_request(
    channel: &str,
    version: &str,
    waves: &str,
    failure: &str,
    windows: &[String],
    node_timeout: Option<&str>,
) -> anyhow::Result<RolloutCreate> {
    Ok(RolloutCreate {
        channel: channel.into(),
        version: version.into(),
        waves: parse_waves(waves, failure)?,
        windows: windows.iter().map(|w| parse_window(w)).collect::<anyhow::Result<_>>()?,
        node_timeout_s: node_timeout
            .map(|d| parse_duration_s(d).context("--node-timeout"))
            .transpose()?,
    })
}

fn hhmm(min: u16) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

/// One line per rollout.
pub fn list_text(rs: &[Rollout]) -> String {
    let mut t = format!(
        "{:>4} {:<10} {:<10} {:<10} {:>6} {:>7} {:>7} {:>6}\n",
        "ID", "CHANNEL", "VERSION", "STATE", "WAVE", "NODES", "BLESSED", "FAILED"
    );
    for r in rs {
        let (blessed, failed) = (0..r.waves.len())
            .map(|w| r.counts(w))
            .fold((0, 0), |(b, f), c| (b + c.blessed, f + c.failed));
        let _ = writeln!(
            t,
            "{:>4} {:<10} {:<10} {:<10} {:>6} {:>7} {:>7} {:>6}",
            r.id,
            r.channel,
            r.version,
            r.state.as_str(),
            format!("{}/{}", r.wave + 1, r.waves.len()),
            r.nodes.len(),
            blessed,
            failed
        );
    }
    t
}

/// One rollout in detail: per wave its nodes per phase and bytes, then each failed node.
pub fn status_text(r: &Rollout) -> String {
    let mut t = format!(
        "rollout {} of {} to {}: {}{}\n",
        r.id,
        r.channel,
        r.version,
        r.state.as_str(),
        r.reason.as_ref().map_or(String::new(), |why| format!(" ({why})"))
    );
    let _ = writeln!(t, "node timeout: {} s", r.node_timeout_ms / 1000);
    for w in &r.windows {
        let _ = writeln!(
            t,
            "window: {}={} {}-{} UTC",
            w.key,
            w.value,
            hhmm(w.start_min),
            hhmm(w.end_min)
        );
    }
    let _ = writeln!(
        t,
        "{:>4} {:>6} {:>6} {:>6} {:>7} {:>7} {:>6} {:>4} {:>14} {:<10} PHASES",
        "WAVE", "UNTIL", "LIMIT", "NODES", "BLESSED", "CURRENT", "FAILED", "LEFT", "BYTES", "STATE"
    );
    for (w, spec) in r.waves.iter().enumerate() {
        let c = r.counts(w);
        let state = if r.wave_done_ms.get(w).copied().flatten().is_some() {
            "done"
        } else if w == r.wave {
            "open"
        } else if w < r.wave {
            "closed"
        } else {
            "waiting"
        };
        let phases: Vec<String> = c.phases.iter().map(|(p, n)| format!("{p} {n}")).collect();
        let _ = writeln!(
            t,
            "{:>4} {:>5}% {:>5}% {:>6} {:>7} {:>7} {:>6} {:>4} {:>14} {:<10} {}",
            w + 1,
            spec.until_pct,
            spec.max_failure_pct,
            c.nodes,
            c.blessed,
            c.current,
            c.failed,
            c.left,
            format!("{}/{}", c.bytes_done, c.bytes_total),
            state,
            phases.join(", ")
        );
    }
    for n in r.nodes.iter().filter(|n| n.failed()) {
        let _ = writeln!(
            t,
            "failed: {} (wave {}) {}: {}",
            n.node,
            n.wave + 1,
            n.phase,
            n.reason.as_deref().unwrap_or("-")
        );
    }
    for (what, phase) in [("current", CURRENT), ("left", LEFT)] {
        for n in r.nodes.iter().filter(|n| n.phase == phase) {
            let why = n.reason.as_deref().unwrap_or("-");
            let _ = writeln!(t, "{what}: {} (wave {}): {why}", n.node, n.wave + 1);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::rollout::{NodeProgress, RolloutState, WindowRule};

    #[test]
    fn arguments_parse_and_bad_ones_name_the_flag() -> anyhow::Result<()> {
        let w = parse_waves("5,25,100", "0")?;
        assert_eq!(
            w.iter().map(|w| (w.until_pct, w.max_failure_pct)).collect::<Vec<_>>(),
            [(5, 0), (25, 0), (100, 0)]
        );
        let e = parse_waves("5,100", "0,1,2").expect_err("mismatch").to_string();
        assert!(e.contains("3 values for 2 waves"), "{e}");
        let e = parse_waves("5,x", "0").expect_err("bad").to_string();
        assert!(e.contains("--waves") && e.contains("\"x\""), "{e}");
        let win = parse_window("site=ams1@02:00-04:00")?;
        assert_eq!(
            (win.label.as_str(), win.start.as_str(), win.end.as_str()),
            ("site=ams1", "02:00", "04:00")
        );
        assert!(parse_window("site=ams1").is_err());
        assert_eq!(
            ["90m", "6h", "2d", "45s", "120"].map(|d| parse_duration_s(d).ok()),
            [Some(5400), Some(21_600), Some(172_800), Some(45), Some(120)]
        );
        let e = format!(
            "{:#}",
            create_request("stable", "2.0", "100", "0", &[], Some("6x")).expect_err("bad")
        );
        assert!(e.contains("--node-timeout") && e.contains("\"6x\""), "{e}");
        assert!(parse_duration_s("99999999999999999d").is_err());
        Ok(())
    }

    #[test]
    fn status_shows_phases_bytes_and_failures_per_wave() {
        let node = |id: &str, wave: usize, phase: &str, reason: Option<&str>| NodeProgress {
            node: id.into(),
            wave,
            labels: Default::default(),
            told_ms: Some(1),
            phase: phase.into(),
            bytes_done: 50,
            bytes_total: 100,
            reason: reason.map(Into::into),
            at_ms: Some(2),
        };
        let r = Rollout {
            id: 3,
            channel: "stable".into(),
            version: "2.0".into(),
            waves: vec![
                WaveSpec { until_pct: 10, max_failure_pct: 0 },
                WaveSpec { until_pct: 100, max_failure_pct: 10 },
            ],
            windows: vec![WindowRule {
                key: "site".into(),
                value: "ams1".into(),
                start_min: 120,
                end_min: 240,
            }],
            node_timeout_ms: 5_400_000,
            state: RolloutState::Halted,
            reason: Some("wave 2 of 2: 1 of 2".into()),
            wave: 1,
            wave_opened_ms: vec![Some(1), Some(2)],
            wave_done_ms: vec![Some(2), None],
            nodes: vec![
                node("a", 0, "blessed", None),
                node("b", 1, "rolled_back", Some("GPU health worse")),
                node("c", 1, "downloading", None),
                node("d", 1, "current", Some("already on 2.0: not told")),
                node("e", 1, "left", Some("left the channel in phase pending")),
            ],
            created_ms: 1,
            updated_ms: 2,
        };
        let t = status_text(&r);
        assert!(t.starts_with("rollout 3 of stable to 2.0: halted (wave 2 of 2: 1 of 2)"), "{t}");
        assert!(t.contains("window: site=ams1 02:00-04:00 UTC"), "{t}");
        assert!(t.contains("node timeout: 5400 s"), "{t}");
        assert!(t.contains("current 1, downloading 1, left 1, rolled_back 1"), "{t}");
        assert!(t.contains("200/400"), "{t}");
        assert!(t.contains("failed: b (wave 2) rolled_back: GPU health worse"), "{t}");
        assert!(t.contains("current: d (wave 2): already on 2.0: not told"), "{t}");
        assert!(t.contains("left: e (wave 2): left the channel in phase pending"), "{t}");
        // Wave 2: 4 nodes, 0 blessed, 1 current, 1 failed, 1 left.
        let wave2 = t.lines().find(|l| l.trim_start().starts_with("2 ")).unwrap_or_default();
        let cols: Vec<&str> = wave2.split_whitespace().take(8).collect();
        assert_eq!(cols, ["2", "100%", "10%", "4", "0", "1", "1", "1"], "{t}");
        let l = list_text(&[r]);
        assert!(l.lines().nth(1).is_some_and(|x| x.contains("halted") && x.contains("2/2")), "{l}");
    }
}
