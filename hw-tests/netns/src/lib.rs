//! Network-namespace harness for the tunnel test (`tests/tunnel.rs`, `docs/0006-tunnel.md`).
//!
//! Entry points: [`Netns::create`] (a namespace joined to the root namespace by a veth pair, torn
//! down on drop), [`Netns::firewall_inbound`] (nftables: only loopback and established or related
//! traffic enters), [`Netns::outage`] (every packet on the veth dropped, both ways, until the guard
//! drops), [`Proc`] (a child process killed on drop), [`echo_server`] (the workload behind the
//! firewall, binary `netns-echo`) and [`log_lines`] (the agent's JSON log, by message).
//!
//! Needs root, iproute2 (`ip netns`) and nftables (`nft`); [`missing_prerequisites`] says which
//! is missing. The test is `#[ignore]`d and run as root by `scripts/test`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

/// What keeps the namespace test from running here, if anything.
pub fn missing_prerequisites() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
    });
    if uid.as_deref() != Some("0") {
        return Some("needs root (effective uid 0)".into());
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let ok = Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("needs `{tool}` (Debian package {pkg})"));
        }
    }
    None
}

/// Run a command; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// A network namespace joined to the root namespace by a veth pair (`/24`: root side `.1`,
/// namespace side `.2`). Deleted, with its veth pair, on drop.
#[derive(Debug)]
pub struct Netns {
    /// Namespace name.
    pub name: String,
    /// The veth end inside the namespace.
    pub inner_if: String,
    /// Address of the root namespace's end.
    pub outer_addr: String,
    /// Address of the namespace's end.
    pub inner_addr: String,
}

impl Netns {
    /// Create namespace `hearth-t{tag}` with veth `ht{tag}o` (root) / `ht{tag}i` (inside), on
    /// `10.237.{tag % 250}.0/24`.
    pub fn create(tag: u32) -> anyhow::Result<Self> {
        let name = format!("hearth-t{tag}");
        let (outer, inner) = (format!("ht{tag}o"), format!("ht{tag}i"));
        let net = format!("10.237.{}", tag % 250);
        // Leftovers of an earlier, killed run with the same tag.
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &outer]);
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            inner_if: inner.clone(),
            outer_addr: format!("{net}.1"),
            inner_addr: format!("{net}.2"),
        };
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
        ip(&["link", "set", &inner, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{}/24", ns.outer_addr), "dev", &outer])?;
        ip(&["link", "set", &outer, "up"])?;
        run(ns.cmd("ip").args(["addr", "add", &format!("{}/24", ns.inner_addr), "dev", &inner]))?;
        run(ns.cmd("ip").args(["link", "set", &inner, "up"]))?;
        run(ns.cmd("ip").args(["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn nft(&self, script: &str) -> anyhow::Result<()> {
        let mut child = self
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The node's firewall: every inbound packet dropped except loopback and established or
    /// related traffic (so no connection can be opened to the namespace; its own outbound ones
    /// work).
    pub fn firewall_inbound(&self) -> anyhow::Result<()> {
        self.nft(
            "table inet hearth_firewall {\n chain input {\n  type filter hook input priority 0; policy drop;\n  iif \"lo\" accept\n  ct state established,related accept\n }\n}\n",
        )
    }

    /// Cut the link: every packet on the namespace's veth dropped both ways until the guard drops.
    pub fn outage(&self) -> anyhow::Result<Outage<'_>> {
        let i = &self.inner_if;
        self.nft(&format!(
            "table inet hearth_outage {{\n chain input {{ type filter hook input priority -10; iifname \"{i}\" drop\n }}\n chain output {{ type filter hook output priority -10; oifname \"{i}\" drop\n }}\n}}\n"
        ))?;
        Ok(Outage { ns: self, ended: false })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end and so the pair.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A link outage, ended by [`Outage::end`] or on drop.
#[derive(Debug)]
pub struct Outage<'a> {
    ns: &'a Netns,
    ended: bool,
}

impl Outage<'_> {
    /// Bring the link back.
    pub fn end(mut self) -> anyhow::Result<()> {
        self.ended = true;
        self.ns.nft("delete table inet hearth_outage\n")
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.ns.nft("delete table inet hearth_outage\n");
        }
    }
}

/// A child process (its output in a log file), killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Spawn `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdout(f.try_clone()?)
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Self { child, log: log.to_path_buf() })
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log's last `n` lines (for failure messages).
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serve TCP echo on `addr` until killed (one thread per connection).
pub fn echo_server(addr: &str) -> anyhow::Result<()> {
    let l =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// The JSON log lines of `path` (tracing's JSON format) whose message is `message`: their fields.
pub fn log_lines(path: &Path, message: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("fields").and_then(|f| f.as_object()).cloned())
        .filter(|f| f.get("message").and_then(|m| m.as_str()) == Some(message))
        .collect()
}

/// The directory of the workspace's binaries next to a test executable (`target/debug`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("test executable without a directory")?;
    let dir = if deps.ends_with("deps") { deps.parent().unwrap_or(deps) } else { deps };
    for b in ["hearth-agent", "hearth-fleet", "hearthctl"] {
        if !dir.join(b).exists() {
            bail!(
                "{} missing: build it first (cargo build -p hearth-agent -p hearth-fleet -p hearthctl)",
                dir.join(b).display()
            );
        }
    }
    Ok(dir.to_path_buf())
}
