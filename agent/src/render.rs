//! Text rendering of API answers for the terminal (`hearth-agent status`, `health`, `power`).

use std::fmt::Write as _;
use std::io::Write as _;

use hearth_proto::api::{
    GpuVerdict, HealthReport, NodeState, NodeStatus, PowerMode, PowerReport, SubsystemState,
};
use hearth_proto::gpu::GpuEventKind;

/// Write a line to stdout (the CLI's output; errors such as a closed pipe are ignored).
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
}

/// Write a line to stderr.
pub fn err(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn state_word(s: NodeState) -> &'static str {
    match s {
        NodeState::Starting => "starting",
        NodeState::Ready => "ready",
        NodeState::Degraded => "degraded",
        NodeState::Draining => "draining",
        NodeState::Quarantined => "QUARANTINED",
    }
}

fn snake<T: std::fmt::Debug>(v: T) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn verdict_word(v: GpuVerdict) -> &'static str {
    match v {
        GpuVerdict::Healthy => "healthy",
        GpuVerdict::Degraded => "degraded",
        GpuVerdict::Failed => "FAILED",
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn watts(mw: u32) -> String {
    format!("{}", (mw + 500) / 1000)
}

/// `hearth-agent status`.
pub fn status(s: &NodeStatus) -> String {
    let mut o = String::new();
    let driver = s
        .driver
        .as_ref()
        .map(|d| format!("driver {}  CUDA {}", d.driver_version, d.cuda_version))
        .unwrap_or_else(|| "driver ?".into());
    let _ = writeln!(
        o,
        "{}  {}  backend {}  {}  agent {}  up {}",
        s.hostname,
        state_word(s.state),
        s.backend,
        driver,
        s.agent_version,
        duration(s.uptime_s)
    );
    // Fleet membership (crate::fleet).
    let f = &s.fleet;
    let _ = writeln!(
        o,
        "fleet: {}{}{}{}",
        f.state,
        f.node_id.as_ref().map(|n| format!("  node {n}")).unwrap_or_default(),
        f.fleet_url.as_ref().map(|u| format!("  at {u}")).unwrap_or_default(),
        f.last_error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default()
    );
    let subs: Vec<String> = s
        .subsystems
        .iter()
        .map(|x| {
            let state = match x.state {
                SubsystemState::Starting => "starting",
                SubsystemState::Running => "running",
                SubsystemState::Failed => "FAILED",
                SubsystemState::Stopped => "stopped",
            };
            let restarts =
                if x.restarts > 0 { format!(" ({} restarts)", x.restarts) } else { String::new() };
            format!("{} {state}{restarts}", x.name)
        })
        .collect();
    let _ = writeln!(o, "subsystems: {}", subs.join(" · "));
    for x in s.subsystems.iter().filter(|x| x.state == SubsystemState::Failed) {
        if let Some(e) = &x.last_error {
            let _ = writeln!(o, "  {}: {e}", x.name);
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:>3} {:<14} {:<24} {:>4} {:>4} {:>6} {:>11} {:>9} {:>4} {:>9} {:<22} HEALTH",
        "GPU",
        "UUID",
        "MODEL",
        "TEMP",
        "MEM",
        "MARGIN",
        "POWER W",
        "LIMIT W",
        "UTIL",
        "SM/MEM",
        "THROTTLE",
    );
    for g in &s.gpus {
        let inv = &g.inventory;
        let uuid: String = inv.uuid.chars().take(13).collect();
        let model: String = inv.name.trim_start_matches("NVIDIA ").chars().take(24).collect();
        let line = match &g.sample {
            Some(x) => {
                let mem = x.temp_memory_c.map(|t| format!("{t}C")).unwrap_or_else(|| "-".into());
                let margin =
                    x.thermal_margin_c.map(|t| format!("{t}C")).unwrap_or_else(|| "-".into());
                let inst = x.power_instant_mw.map(watts).unwrap_or_else(|| "-".into());
                let limit = if x.enforced_power_limit_mw == x.power_limit_mw {
                    watts(x.power_limit_mw)
                } else {
                    format!("{}/{}", watts(x.power_limit_mw), watts(x.enforced_power_limit_mw))
                };
                let names = x.throttle.names();
                let throttle = if names.is_empty() { "-".to_string() } else { names.join(",") };
                format!(
                    "{:>3} {:<14} {:<24} {:>4} {:>4} {:>6} {:>11} {:>9} {:>3}% {:>9} {:<22} {}",
                    inv.index,
                    uuid,
                    model,
                    format!("{}C", x.temp_core_c),
                    mem,
                    margin,
                    format!("{}/{}", watts(x.power_avg_mw), inst),
                    limit,
                    x.util_gpu_pct,
                    format!("{}/{}", x.sm_clock_mhz, x.mem_clock_mhz),
                    throttle,
                    verdict_word(g.health.verdict)
                )
            }
            None => format!(
                "{:>3} {:<14} {:<24} {:<77} {}",
                inv.index,
                uuid,
                model,
                g.sample_error.as_deref().unwrap_or("no reading"),
                verdict_word(g.health.verdict)
            ),
        };
        let _ = writeln!(o, "{line}");
        for r in &g.health.reasons {
            let _ = writeln!(o, "      ! {r}");
        }
    }
    if s.gpus.is_empty() {
        let _ = writeln!(o, "(no GPU inventory yet)");
    }
    o
}

/// One line under `hearth-agent status`: GPUs by service state, host checks that are not
/// healthy, the reboot request and the last verdict change.
pub fn health_summary(h: &HealthReport) -> String {
    let mut by_state: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    for g in &h.gpus {
        by_state.entry(snake(g.service)).or_default().push(g.index);
    }
    let mut parts: Vec<String> = by_state
        .iter()
        .map(|(s, gpus)| {
            if s == "serving" {
                format!("{} serving", gpus.len())
            } else {
                let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
                format!("{s}: GPU {}", list.join(", "))
            }
        })
        .collect();
    if !h.missing_gpus.is_empty() {
        parts.push(format!("{} missing", h.missing_gpus.len()));
    }
    for c in h.host.iter().filter(|c| c.verdict != GpuVerdict::Healthy) {
        parts.push(format!("host {} {}: {}", c.name, verdict_word(c.verdict), c.detail));
    }
    if let Some(r) = &h.reboot_requested {
        parts.push(format!("REBOOT REQUESTED: {r}"));
    }
    if let Some(c) = h.history.last() {
        parts.push(format!("last change #{} {} -> {}", c.seq, c.subject, verdict_word(c.to)));
    }
    format!("health: {}", parts.join("; "))
}

/// `hearth-agent health`.
pub fn health(h: &HealthReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}{}  (state generation {})",
        state_word(h.state),
        if h.drained { ", drain requested" } else { "" },
        h.generation
    );
    if let Some(r) = &h.reboot_requested {
        let _ = writeln!(o, "REBOOT REQUESTED: {r}");
    }
    for g in &h.gpus {
        let idle = match g.idle {
            Some(true) => "idle",
            Some(false) => "busy",
            None => "?",
        };
        let _ = writeln!(
            o,
            "GPU {:>2} {}  {}  {}  action {}  {idle}{}",
            g.index,
            g.uuid,
            verdict_word(g.health.verdict),
            snake(g.service),
            snake(g.action),
            if g.recurrences > 0 {
                format!("  recurrences {}", g.recurrences)
            } else {
                String::new()
            }
        );
        for r in &g.health.reasons {
            let _ = writeln!(o, "        {r}");
        }
    }
    for m in &h.missing_gpus {
        let _ = writeln!(
            o,
            "GPU  - {m}  FAILED  missing (in the first-boot inventory, not on the bus)"
        );
    }
    if !h.host.is_empty() {
        let _ = writeln!(o, "host:");
        for c in &h.host {
            let _ = writeln!(o, "  {:<12} {:<9} {}", c.name, verdict_word(c.verdict), c.detail);
        }
    }
    if !h.history.is_empty() {
        let _ = writeln!(o, "verdict changes:");
        for c in &h.history {
            let _ = writeln!(
                o,
                "  #{} {}  {}  {} -> {}{}  action {}  {}",
                c.seq,
                c.at_ms,
                c.subject,
                verdict_word(c.from),
                verdict_word(c.to),
                c.service.map(|s| format!(" ({})", snake(s))).unwrap_or_default(),
                snake(c.action),
                c.reasons.join("; ")
            );
        }
    }
    if !h.recent_events.is_empty() {
        let _ = writeln!(o, "recent events:");
        for e in &h.recent_events {
            let what = match e.event.kind {
                GpuEventKind::Xid(x) => format!("XID {x}"),
                GpuEventKind::SingleBitEcc => "single-bit ECC".into(),
                GpuEventKind::DoubleBitEcc => "double-bit ECC".into(),
            };
            let _ = writeln!(o, "  {}  GPU {:>2}  {what}", e.at_ms, e.event.gpu);
        }
    }
    o
}

/// `hearth-agent power`.
pub fn power(p: &PowerReport) -> String {
    let mut o = String::new();
    match &p.control {
        Some(c) => {
            let budget = c.settings.budget_w.map_or_else(|| "none".into(), |b| format!("{b} W"));
            let mode = match c.mode {
                PowerMode::NoBudget => "no budget (vendor limits, thermal only)",
                PowerMode::Budget => "holding the budget",
                PowerMode::Failsafe => "FAILSAFE: telemetry missing, static safe caps",
            };
            let target =
                |t: Option<u32>, d: &str| t.map_or_else(|| d.to_string(), |t| format!("{t} C"));
            let _ = writeln!(
                o,
                "budget {budget}, draw {} W, caps handed out {} W; {mode}",
                (p.total_draw_mw + 500) / 1000,
                c.allocated_w
            );
            let _ = writeln!(
                o,
                "targets: core {}, memory {} (settings generation {})",
                target(c.settings.core_target_c, "T.Limit - 8 C"),
                target(c.settings.memory_target_c, "max - 8 C"),
                c.generation
            );
        }
        None => {
            let _ = writeln!(
                o,
                "total draw {} W; power control not running yet",
                (p.total_draw_mw + 500) / 1000
            );
        }
    }
    let _ = writeln!(
        o,
        "{:>3} {:>7} {:>7} {:>9} {:>6} {:<8} {:>6} {:>17}",
        "GPU", "DRAW W", "LIMIT W", "ENFORCED", "CAP W", "WHY", "LOCK", "RANGE W (DEFAULT)"
    );
    for g in &p.gpus {
        let opt = |v: Option<u32>| v.map(watts).unwrap_or_else(|| "-".into());
        let reason = g.reason.map_or_else(|| "-".into(), |r| format!("{r:?}").to_lowercase());
        let _ = writeln!(
            o,
            "{:>3} {:>7} {:>7} {:>9} {:>6} {:<8} {:>6} {:>17}",
            g.index,
            opt(g.draw_mw),
            opt(g.limit_mw),
            opt(g.enforced_limit_mw),
            g.cap_w.map_or_else(|| "-".into(), |c| c.to_string()),
            reason,
            g.clock_lock_mhz.map_or_else(|| "-".into(), |m| m.to_string()),
            format!("{}-{} ({})", watts(g.min_mw), watts(g.max_mw), watts(g.default_mw))
        );
    }
    o
}
