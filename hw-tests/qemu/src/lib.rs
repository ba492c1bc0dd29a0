//! `hearth-qemu`: boot Hearth OS images in QEMU and watch them from the host.
//!
//! Entry point: [`Vm::start`] with a [`VmConfig`]; it returns a handle that reads the guest's
//! serial console line by line ([`Vm::wait_for`]), speaks QMP ([`Vm::qmp`], [`Vm::powerdown`])
//! and kills QEMU on drop. One reader thread per VM collects the console into a shared log with
//! timestamps measured from the start of QEMU.
//!
//! - Firmware: OVMF + systemd-boot + the UKI (the path real hardware takes), or direct kernel
//!   boot ([`Boot::Kernel`]) where a test wants to skip the firmware.
//! - Disk: a qcow2 overlay over the built raw image ([`overlay`]), so the image stays pristine
//!   and the disk can be larger than the image (first boot grows the data partition into it).
//! - Network: user-mode (slirp); the guest reaches the host's loopback at [`HOST_FROM_GUEST`].
//! - Credentials: systemd credentials through SMBIOS type 11 ([`VmConfig::credential`]).
//! - Acceleration: TCG unless KVM is proven to run a guest here ([`Accel::detect`]).
//!
//! The power-cut and update tests build on this launcher: the disk served by `hearth-nbd`
//! ([`VmConfig::nbd`]: unflushed writes are lost when QEMU dies), reboots inside one QEMU
//! ([`VmConfig::reboot`]), lines per boot ([`Vm::mark`], [`Vm::wait_for_from`]), a watchdog
//! reset ([`Vm::reset`]) and power cuts ([`Vm::kill`]). Design: `docs/0008-image.md`; code tour: `hw-tests/README.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

mod files;
pub use files::{FileServer, ServedStats};

/// The host's loopback as the guest sees it under user-mode networking.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Where Debian's `ovmf` package puts the firmware (code, variables template).
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/qemu/OVMF_CODE.fd", "/usr/share/qemu/OVMF_VARS.fd"),
];

/// Why a VM could not be started or did not do what was expected.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A file the VM needs is missing.
    #[error("{what} {path} does not exist{hint}")]
    Missing {
        /// What the file is.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// No OVMF firmware in any known place.
    #[error("no OVMF firmware found (install Debian's ovmf package); looked in {looked}")]
    NoFirmware {
        /// The paths tried.
        looked: String,
    },
    /// A command (QEMU, qemu-img) could not be run or failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command.
        command: String,
        /// Its exit status and output, or the spawn error.
        detail: String,
    },
    /// A file operation in the work directory failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console did not show what was awaited in time.
    #[error("no console line {what} within {timeout:?}; QEMU {state}; last console lines:\n{tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
        /// Whether QEMU is still running.
        state: String,
        /// The end of the console log.
        tail: String,
    },
    /// A QMP exchange failed.
    #[error("QMP {command}: {detail}")]
    Qmp {
        /// The command.
        command: String,
        /// What went wrong.
        detail: String,
    },
}

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: slow, works everywhere.
    Tcg,
    /// Hardware virtualisation.
    Kvm,
}

impl Accel {
    /// `HEARTH_QEMU_ACCEL=tcg|kvm` when set; otherwise KVM only if `/dev/kvm` opens and a guest
    /// kernel actually runs under it ([`Accel::probe_kvm`] with `probe_kernel`), else TCG.
    /// (`/dev/kvm` of a paravirtual nested hypervisor opens but cannot run ordinary guests.)
    pub fn detect(probe_kernel: Option<&Path>) -> Accel {
        match std::env::var("HEARTH_QEMU_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        let openable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        match probe_kernel {
            Some(kernel) if openable && Self::probe_kvm(kernel) => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }

    /// Boot `kernel` under KVM with no root file system for at most 20 s: KVM works when the
    /// kernel gets as far as its panic for the missing root.
    pub fn probe_kvm(kernel: &Path) -> bool {
        let child = Command::new(QEMU)
            .args(["-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256"])
            .args(["-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(kernel)
            .args(["-append", "console=ttyS0 panic=-1 root=/dev/hearth-probe-none"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return false };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        out.contains("Kernel panic") || out.contains("VFS: Unable to mount root")
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// UEFI: OVMF, then systemd-boot from the ESP, then the UKI.
    Uefi {
        /// OVMF code (read-only).
        code: PathBuf,
        /// OVMF variables template (copied into the work directory per VM).
        vars: PathBuf,
    },
    /// Direct kernel boot, skipping the firmware and boot loader.
    Kernel {
        /// The kernel.
        kernel: PathBuf,
        /// An initrd, if any.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        append: String,
    },
}

impl Boot {
    /// UEFI with the first OVMF found in [`OVMF_CANDIDATES`].
    pub fn uefi() -> Result<Boot, QemuError> {
        OVMF_CANDIDATES
            .iter()
            .find(|(code, vars)| Path::new(code).exists() && Path::new(vars).exists())
            .map(|(code, vars)| Boot::Uefi { code: code.into(), vars: vars.into() })
            .ok_or_else(|| QemuError::NoFirmware {
                looked: OVMF_CANDIDATES.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", "),
            })
    }
}

/// What to boot, and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The disk (raw or qcow2; see [`overlay`]), or the Unix socket of an NBD server when
    /// [`VmConfig::nbd`] is set.
    pub disk: PathBuf,
    /// The disk is served over NBD at the socket [`VmConfig::disk`] (`hearth-nbd`'s power-cut
    /// server), with `cache=writeback`: the guest sees a volatile write cache and sends flushes,
    /// which arrive as `NBD_CMD_FLUSH`.
    pub nbd: bool,
    /// Reboots stay inside this QEMU (no `-no-reboot`): the update tests reboot into the other
    /// slot; the boot tests exit on the guest's reboot.
    pub reboot: bool,
    /// Firmware or kernel.
    pub boot: Boot,
    /// TCG or KVM.
    pub accel: Accel,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// systemd credentials passed through SMBIOS type 11: name and value.
    pub credentials: Vec<(String, Vec<u8>)>,
    /// Added to the UKI's kernel command line by systemd-stub (SMBIOS type 11
    /// `io.systemd.stub.kernel-cmdline-extra`; honoured without Secure Boot), e.g. a longer
    /// device timeout for a generic kernel probing every module under TCG.
    pub cmdline_extra: Vec<String>,
    /// A root shell on a second serial port (`ttyS1`, systemd's `debug-shell.service` through
    /// `systemd.debug_shell=ttyS1` on the command line extra) reached through the Unix socket
    /// `work_dir/shell.sock` ([`Vm::shell`]): how the update tests run `hearth-agent update`
    /// commands in the guest. On every boot of this VM, whichever slot boots.
    pub debug_shell: bool,
    /// Directory for the QMP socket, the firmware variables and the console log.
    pub work_dir: PathBuf,
    /// Resume a machine saved by [`Vm::save_state`] instead of powering on (QEMU's
    /// `-incoming file:PATH`): the guest runs on from where it was saved, without booting. The
    /// rest of the configuration must be the one it was saved with, and the firmware variables
    /// (`work_dir/ovmf-vars.fd`) and the disk must be as they were then.
    pub incoming: Option<PathBuf>,
}

impl VmConfig {
    /// A VM booting `disk` through UEFI with 2 CPUs and 2 GiB, TCG unless KVM works.
    pub fn new(disk: &Path, work_dir: &Path) -> Result<VmConfig, QemuError> {
        Ok(VmConfig {
            disk: disk.to_path_buf(),
            nbd: false,
            reboot: false,
            boot: Boot::uefi()?,
            accel: Accel::Tcg,
            memory_mib: 2048,
            cpus: 2,
            credentials: Vec::new(),
            // A starved TCG guest can fail the kernel's IO-APIC timer check and panic ("IO-APIC +
            // timer doesn't work!", seen at load 13 on 2 cores); virtual machines skip it.
            cmdline_extra: vec!["no_timer_check".into()],
            debug_shell: false,
            work_dir: work_dir.to_path_buf(),
            incoming: None,
        })
    }

    /// Add a systemd credential (`io.systemd.credential.binary:NAME=BASE64`).
    pub fn credential(mut self, name: &str, value: &[u8]) -> VmConfig {
        self.credentials.push((name.to_string(), value.to_vec()));
        self
    }

    /// QEMU's arguments for this configuration.
    pub fn args(&self) -> Result<Vec<String>, QemuError> {
        let mut a: Vec<String> = self.accel.args().iter().map(|s| s.to_string()).collect();
        let m = self.memory_mib.to_string();
        let c = self.cpus.to_string();
        a.extend(["-machine", "q35", "-m", &m, "-smp", &c].map(String::from));
        a.extend(["-display", "none", "-monitor", "none", "-serial", "stdio"].map(String::from));
        if !self.reboot {
            a.push("-no-reboot".into());
        }
        let qmp = self.work_dir.join("qmp.sock");
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", qmp.display()));
        match &self.boot {
            Boot::Uefi { code, vars } => {
                let vars_copy = self.work_dir.join("ovmf-vars.fd");
                // A resumed machine keeps the variables it was saved with.
                if self.incoming.is_none() || !vars_copy.exists() {
                    std::fs::copy(vars, &vars_copy).map_err(|source| QemuError::Io {
                        op: "copy",
                        path: vars.clone(),
                        source,
                    })?;
                }
                a.push("-drive".into());
                a.push(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display()));
                a.push("-drive".into());
                a.push(format!("if=pflash,format=raw,unit=1,file={}", vars_copy.display()));
            }
            Boot::Kernel { kernel, initrd, append } => {
                a.push("-kernel".into());
                a.push(kernel.display().to_string());
                if let Some(initrd) = initrd {
                    a.push("-initrd".into());
                    a.push(initrd.display().to_string());
                }
                a.push("-append".into());
                a.push(append.clone());
            }
        }
        a.push("-drive".into());
        if self.nbd {
            a.push(format!(
                "if=virtio,format=raw,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path={}",
                self.disk.display()
            ));
        } else {
            let format =
                if self.disk.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
            a.push(format!("if=virtio,format={format},file={}", self.disk.display()));
        }
        a.extend(
            ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"].map(String::from),
        );
        a.extend(["-device", "virtio-rng-pci"].map(String::from));
        let mut extra = self.cmdline_extra.clone();
        if self.debug_shell {
            let sock = self.work_dir.join("shell.sock");
            a.push("-chardev".into());
            a.push(format!("socket,id=shell0,path={},server=on,wait=off", sock.display()));
            a.extend(["-device", "isa-serial,chardev=shell0"].map(String::from));
            extra.push("systemd.debug_shell=ttyS1".into());
        }
        if !extra.is_empty() {
            a.push("-smbios".into());
            // QEMU's -smbios value: commas are doubled.
            let extra = extra.join(" ").replace(',', ",,");
            a.push(format!("type=11,value=io.systemd.stub.kernel-cmdline-extra={extra}"));
        }
        for (name, value) in &self.credentials {
            let b64 = base64::engine::general_purpose::STANDARD.encode(value);
            a.push("-smbios".into());
            a.push(format!("type=11,value=io.systemd.credential.binary:{name}={b64}"));
        }
        if let Some(state) = &self.incoming {
            a.push("-incoming".into());
            a.push(format!("file:{}", state.display()));
        }
        Ok(a)
    }
}

/// A fresh work directory for one test's VM, `target/qemu/NAME` of this workspace (or
/// `$CARGO_TARGET_DIR/qemu/NAME`): emptied first, kept afterwards so its `console.log` can be
/// read after a failure.
pub fn work_dir(name: &str) -> Result<PathBuf, QemuError> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("qemu").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| QemuError::Io {
            op: "remove",
            path: dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| QemuError::Io {
        op: "create",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// `key=value` from a console line (`HEARTH-BOOT-CHECK ...`, `HEARTH-IMAGE ...`); values have no
/// spaces, except a quoted last field such as `status="..."`, which this does not return whole.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Create a qcow2 overlay at `overlay` over the raw `base` image, `size_gib` large.
pub fn overlay(base: &Path, overlay: &Path, size_gib: u32) -> Result<(), QemuError> {
    if !base.exists() {
        return Err(QemuError::Missing {
            what: "image",
            path: base.to_path_buf(),
            hint: " (build it with image/build --profile PROFILE)",
        });
    }
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .arg(format!("{size_gib}G"))
        .output()
        .map_err(|e| QemuError::Command {
            command: "qemu-img create".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(QemuError::Command {
            command: "qemu-img create".into(),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

/// One console line and when it arrived (since QEMU started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Time since start.
    pub at: Duration,
    /// The text, terminal escapes removed.
    pub text: String,
}

#[derive(Debug, Default)]
struct Console {
    lines: Vec<Line>,
    closed: bool,
}

/// A running VM; QEMU is killed on drop.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    started: Instant,
    console: Arc<(Mutex<Console>, Condvar)>,
    qmp_path: PathBuf,
    shell_path: PathBuf,
    shell: Mutex<Option<UnixStream>>,
    log_path: PathBuf,
}

/// Remove terminal escape sequences (`ESC [ ... letter`) and carriage returns.
pub fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

impl Vm {
    /// Start QEMU. The console is also written to `work_dir/console.log`.
    pub fn start(config: &VmConfig) -> Result<Vm, QemuError> {
        if !config.nbd && !config.disk.exists() {
            return Err(QemuError::Missing { what: "disk", path: config.disk.clone(), hint: "" });
        }
        let args = config.args()?;
        tracing::info!(accel = ?config.accel, disk = %config.disk.display(), "starting QEMU");
        let mut child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| QemuError::Command { command: QEMU.into(), detail: e.to_string() })?;
        let started = Instant::now();
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let log_path = config.work_dir.join("console.log");
        let mut log = std::fs::File::create(&log_path).map_err(|source| QemuError::Io {
            op: "create",
            path: log_path.clone(),
            source,
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let shared = console.clone();
        std::thread::spawn(move || {
            if let Some(stdout) = stdout {
                let mut reader = BufReader::new(stdout);
                let mut buf = Vec::new();
                while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                    let text = strip_escapes(String::from_utf8_lossy(&buf).trim_end_matches('\n'));
                    let _ = writeln!(log, "[{:8.3}] {text}", started.elapsed().as_secs_f64());
                    let (lock, cvar) = &*shared;
                    if let Ok(mut c) = lock.lock() {
                        c.lines.push(Line { at: started.elapsed(), text });
                    }
                    cvar.notify_all();
                    buf.clear();
                }
            }
            let (lock, cvar) = &*shared;
            if let Ok(mut c) = lock.lock() {
                c.closed = true;
            }
            cvar.notify_all();
        });
        let shared = console.clone();
        std::thread::spawn(move || {
            if let Some(stderr) = stderr {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let (lock, _) = &*shared;
                    if let Ok(mut c) = lock.lock() {
                        c.lines.push(Line { at: started.elapsed(), text: format!("qemu: {line}") });
                    }
                }
            }
        });
        Ok(Vm {
            child,
            started,
            console,
            qmp_path: config.work_dir.join("qmp.sock"),
            shell_path: config.work_dir.join("shell.sock"),
            shell: Mutex::new(None),
            log_path,
        })
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The console log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// How many console lines there are so far: a mark for [`Vm::wait_for_from`] (lines of
    /// the next boot after a reboot).
    pub fn mark(&self) -> usize {
        self.console.0.lock().map(|c| c.lines.len()).unwrap_or_default()
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.console.0.lock().map(|c| c.lines.clone()).unwrap_or_default()
    }

    /// The last `n` console lines, one string.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let start = lines.len().saturating_sub(n);
        lines[start..]
            .iter()
            .map(|l| format!("[{:8.3}] {}", l.at.as_secs_f64(), l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait until a console line satisfies `pred` (lines already seen count), at most `timeout`.
    /// Fails early when QEMU exits.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, QemuError> {
        self.wait_for_from(0, what, timeout, pred)
    }

    /// [`Vm::wait_for`], looking only at lines from index `from` on (a [`Vm::mark`]).
    pub fn wait_for_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, QemuError> {
        let deadline = Instant::now() + timeout;
        let console = self.console.clone();
        let (lock, cvar) = &*console;
        let mut seen = from;
        let Ok(mut guard) = lock.lock() else { return Err(self.timeout(what, timeout)) };
        loop {
            if let Some(line) =
                guard.lines.get(seen..).unwrap_or_default().iter().find(|l| pred(&l.text))
            {
                return Ok(line.clone());
            }
            seen = seen.max(guard.lines.len());
            let now = Instant::now();
            if guard.closed || now >= deadline {
                break;
            }
            guard = match cvar.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => return Err(self.timeout(what, timeout)),
            };
        }
        drop(guard);
        Err(self.timeout(what, timeout))
    }

    fn timeout(&mut self, what: &str, timeout: Duration) -> QemuError {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            _ => "still running".into(),
        };
        QemuError::Timeout { what: what.into(), timeout, state, tail: self.tail(40) }
    }

    /// Run one QMP command (after the capabilities handshake) and return the reply line.
    pub fn qmp(&self, command: &str) -> Result<String, QemuError> {
        self.qmp_with(command, None)
    }

    /// Run one QMP command with `arguments` (a JSON object) and return the reply line.
    pub fn qmp_with(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<String, QemuError> {
        let err = |detail: String| QemuError::Qmp { command: command.into(), detail };
        let mut stream = UnixStream::connect(&self.qmp_path).map_err(|e| err(e.to_string()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| err(e.to_string()))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| err(e.to_string()))?);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| err(format!("greeting: {e}")))?;
        let mut send = |json: String| -> Result<String, QemuError> {
            stream.write_all(json.as_bytes()).map_err(|e| err(e.to_string()))?;
            loop {
                let mut reply = String::new();
                let n = reader.read_line(&mut reply).map_err(|e| err(e.to_string()))?;
                if n == 0 {
                    return Err(err("QMP closed the connection".into()));
                }
                // Asynchronous events interleave with replies.
                if reply.contains("\"return\"") || reply.contains("\"error\"") {
                    return Ok(reply);
                }
            }
        };
        send("{\"execute\":\"qmp_capabilities\"}\n".into())?;
        let mut request = serde_json::json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let reply = send(format!("{request}\n"))?;
        if reply.contains("\"error\"") {
            return Err(err(reply.trim().to_string()));
        }
        Ok(reply)
    }

    /// Type one command line into the guest's root shell ([`VmConfig::debug_shell`]). Its output
    /// goes to the shell's port, not the console: redirect to `/dev/ttyS0` to see it in
    /// [`Vm::lines`], and echo a marker line to wait for.
    pub fn shell(&self, command: &str) -> Result<(), QemuError> {
        let err = |detail: String| QemuError::Qmp { command: format!("shell: {command}"), detail };
        let mut guard = self.shell.lock().map_err(|_| err("shell lock poisoned".into()))?;
        if guard.is_none() {
            // One connection for the VM's life (the guest's reboots do not touch it); what the
            // shell prints (its prompt, the echo) joins the console lines as `ttyS1: ...`.
            let stream = UnixStream::connect(&self.shell_path)
                .map_err(|e| err(format!("{}: {e}", self.shell_path.display())))?;
            let reader = stream.try_clone().map_err(|e| err(e.to_string()))?;
            let shared = self.console.clone();
            let started = self.started;
            std::thread::spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut buf = Vec::new();
                while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                    let text = strip_escapes(String::from_utf8_lossy(&buf).trim_end_matches('\n'));
                    let (lock, cvar) = &*shared;
                    if let Ok(mut c) = lock.lock() {
                        c.lines
                            .push(Line { at: started.elapsed(), text: format!("ttyS1: {text}") });
                    }
                    cvar.notify_all();
                    buf.clear();
                }
            });
            *guard = Some(stream);
        }
        let stream = guard.as_mut().ok_or_else(|| err("no shell connection".into()))?;
        stream.write_all(format!("{command}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
        stream.flush().map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// ACPI power button (QMP `system_powerdown`), then wait for QEMU to exit.
    pub fn powerdown(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        self.qmp("system_powerdown")?;
        self.wait_exit(timeout)
    }

    /// Wait for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Ok(None) => return Err(self.timeout("QEMU exit", timeout)),
                Err(e) => {
                    return Err(QemuError::Command { command: QEMU.into(), detail: e.to_string() });
                }
            }
        }
    }

    /// Save the running machine to `path` and stop QEMU: QMP `stop` (which also flushes every
    /// drive, so an NBD disk's server holds all the guest wrote), then `migrate` to
    /// `file:PATH`, polled with `query-migrate` until it completes. Resume it with
    /// [`VmConfig::incoming`] on a copy of the disk as it is now.
    pub fn save_state(&mut self, path: &Path, timeout: Duration) -> Result<(), QemuError> {
        self.qmp("stop")?;
        self.qmp_with(
            "migrate",
            Some(serde_json::json!({ "uri": format!("file:{}", path.display()) })),
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.qmp("query-migrate")?;
            let status = serde_json::from_str::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v["return"]["status"].as_str().map(String::from))
                .unwrap_or_default();
            match status.as_str() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(QemuError::Qmp {
                        command: "migrate".into(),
                        detail: format!(
                            "saving the machine to {}: {}",
                            path.display(),
                            reply.trim()
                        ),
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(self.timeout("the machine's state saved", timeout));
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        self.kill();
        Ok(())
    }

    /// Wait until the guest runs (QMP `query-status`): after a start with
    /// [`VmConfig::incoming`], once the saved state is loaded; a state saved from a stopped
    /// machine loads paused (QEMU keeps the source's run state) and is continued (`cont`).
    pub fn wait_running(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            // The QMP socket appears once QEMU is up; until then the command fails.
            if let Ok(reply) = self.qmp("query-status") {
                let status = serde_json::from_str::<serde_json::Value>(&reply)
                    .ok()
                    .and_then(|v| v["return"]["status"].as_str().map(String::from));
                match status.as_deref() {
                    Some("running") => return Ok(()),
                    // A machine saved stopped ([`Vm::save_state`]) loads stopped: continue it.
                    Some("paused") => {
                        let _ = self.qmp("cont");
                    }
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                return Err(self.timeout("the guest running", timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reset the machine (QMP `system_reset`), as a hardware watchdog would.
    pub fn reset(&self) -> Result<(), QemuError> {
        self.qmp("system_reset").map(|_| ())
    }

    /// Pull the plug: kill QEMU at once (a power cut for the guest).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}
