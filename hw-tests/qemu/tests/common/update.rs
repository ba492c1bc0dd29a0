//! The rig of the QEMU update tests (`docs/0009-updates.md`, "Tests in QEMU"): the ci image on
//! the `hearth-nbd` power-cut disk, a real fleet on the host's loopback, a TUF repository signed
//! with `hearthctl release sign`'s code and served over plain HTTP at `127.0.0.1:7480` (the ci
//! image's `[update] metadata_url` is `http://10.0.2.2:7480/`), releases derived from the one
//! build by `image/release-version` and `image/release-variant`, and the guest's root shell on
//! `ttyS1` to run `hearth-agent update apply`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_fleet_client::release::{ReleaseVersion, SignSpec, days_from_now, sign_release};
use hearth_nbd::{NbdServer, PowerCutDisk};
use hearth_qemu::{Accel, FileServer, Line, Vm, VmConfig, field};

use super::fleet::TestFleet;
use super::{ESP, ROOT_X86_64, ci_image, env_u64, fresh_disk, gpt, script, workspace};

/// Where the ci image's agent looks for the update repository (host side).
pub const REPO_ADDR: &str = "127.0.0.1:7480";

type Error = Box<dyn std::error::Error>;

/// One update test's world.
pub struct Rig {
    /// `target/qemu/NAME`.
    pub work: PathBuf,
    /// The built ci image (version A).
    pub image: PathBuf,
    /// Version A (the build's).
    pub a: String,
    /// The release keys (`hearthctl release keys init`), whose root.json the image trusts.
    pub keys: PathBuf,
    /// The repository directory the file server serves.
    pub repo: PathBuf,
    /// The fleet.
    pub fleet: TestFleet,
    /// The fleet's seed for the node.
    pub seed: String,
    /// The HTTP server of the repository.
    pub server: FileServer,
    /// The guest's disk (a raw file: the NBD server's durable base).
    pub disk: PathBuf,
    /// The NBD server of the disk.
    pub nbd: Option<NbdServer>,
    /// The VM's configuration (NBD disk, reboots inside QEMU, root shell on ttyS1, the seed).
    pub config: VmConfig,
    /// Bound of one boot.
    pub timeout: Duration,
}

/// The keys directory: `HEARTH_UPDATE_KEYS`, default `target/update-keys` (where `.ci/run` makes
/// them before `image/build --update-root target/update-keys/root.json`).
pub fn keys_dir() -> PathBuf {
    std::env::var_os("HEARTH_UPDATE_KEYS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/update-keys"))
}

impl Rig {
    /// Everything but the VM: work directory, fleet, repository server, a fresh disk.
    pub fn new(name: &str) -> Result<Rig, Error> {
        let image = ci_image();
        if !image.exists() {
            return Err(format!(
                "{} does not exist: run image/build --profile ci --update-root {}/root.json",
                image.display(),
                keys_dir().display()
            )
            .into());
        }
        let keys = keys_dir();
        if !keys.join("root.json").is_file() {
            return Err(format!(
                "no release keys in {} (hearthctl release keys init --dir {0}, then build the image with --update-root {0}/root.json)",
                keys.display()
            )
            .into());
        }
        let work = hearth_qemu::work_dir(name)?;
        let repo = work.join("repo");
        std::fs::create_dir_all(&repo)?;
        let server = FileServer::start(&repo, REPO_ADDR)?;
        let (fleet, seed) = TestFleet::start(&work.join("fleet"))?;
        let disk = work.join("disk.raw");
        fresh_disk(&image, &disk)?;
        let kernel = image.with_extension("vmlinuz");
        let mut config = VmConfig::new(&work.join("nbd.sock"), &work)?
            .credential("hearth.seed", seed.as_bytes());
        config.nbd = true;
        config.reboot = true;
        config.debug_shell = true;
        config.accel = Accel::detect(kernel.exists().then_some(kernel.as_path()));
        let mut rig = Rig {
            work,
            image,
            a: env!("CARGO_PKG_VERSION").to_string(),
            keys,
            repo,
            fleet,
            seed,
            server,
            disk,
            nbd: None,
            config,
            timeout: Duration::from_secs(env_u64("HEARTH_BOOT_TIMEOUT", 600)),
        };
        rig.serve_disk()?;
        Ok(rig)
    }

    /// (Re)start the NBD server on the disk file (after a power cut: what was flushed).
    pub fn serve_disk(&mut self) -> Result<(), Error> {
        self.nbd = None;
        let overlay = self.work.join("overlay");
        let _ = std::fs::remove_file(&overlay);
        self.nbd = Some(NbdServer::start(
            &self.work.join("nbd.sock"),
            PowerCutDisk::open(&self.disk, &overlay)?,
        )?);
        Ok(())
    }

    /// Save the disk as it is now (QEMU stopped) as the snapshot `name`: a sparse copy of the
    /// NBD base file (an NBD drive has no internal `savevm` snapshots).
    pub fn save_snapshot(&self, name: &str) -> Result<PathBuf, Error> {
        let snap = self.work.join(format!("snapshot-{name}.raw"));
        copy_sparse(&self.disk, &snap)?;
        Ok(snap)
    }

    /// Put the snapshot `snap` back as the disk and serve it afresh.
    pub fn restore_snapshot(&mut self, snap: &Path) -> Result<(), Error> {
        self.nbd = None;
        copy_sparse(snap, &self.disk)?;
        self.serve_disk()
    }

    /// Save the running machine as the snapshot `name` ([`Vm::save_state`]: the guest is stopped,
    /// its drives flushed, its state written to a file, QEMU ended) with a sparse copy of the
    /// disk and the firmware variables as they are at that moment. [`Rig::resume`] starts a
    /// machine from it in seconds instead of a boot of minutes under TCG.
    pub fn save_machine(&mut self, mut vm: Vm, name: &str) -> Result<MachineSnapshot, Error> {
        let t = Instant::now();
        let state = self.work.join(format!("machine-{name}.state"));
        vm.save_state(&state, Duration::from_secs(300))?;
        drop(vm);
        self.nbd = None;
        let disk = self.save_snapshot(name)?;
        let vars = self.work.join(format!("machine-{name}.vars"));
        std::fs::copy(self.work.join("ovmf-vars.fd"), &vars)?;
        println!(
            "machine snapshot {name}: {} MiB of state, saved in {:.1} s",
            std::fs::metadata(&state)?.len() >> 20,
            t.elapsed().as_secs_f64()
        );
        self.serve_disk()?;
        Ok(MachineSnapshot { disk, state, vars })
    }

    /// Resume the machine saved in `snap` on a fresh copy of its disk: it runs on from the moment
    /// it was saved (its console starts empty; its connections to the host are gone, and the
    /// agent reconnects to the fleet by itself).
    pub fn resume(&mut self, snap: &MachineSnapshot) -> Result<Vm, Error> {
        self.restore_snapshot(&snap.disk)?;
        std::fs::copy(&snap.vars, self.work.join("ovmf-vars.fd"))?;
        let mut config = self.config.clone();
        config.incoming = Some(snap.state.clone());
        let t = Instant::now();
        let mut vm = Vm::start(&config)?;
        vm.wait_running(Duration::from_secs(120))?;
        println!("resumed the machine snapshot in {:.1} s", t.elapsed().as_secs_f64());
        Ok(vm)
    }

    /// Slot A of the built image: (first byte, length, SHA-256 of its bytes), to compare a disk's
    /// slot with after a fallback.
    pub fn built_slot_a(&self) -> Result<(u64, u64, String), Error> {
        let slot = gpt(&self.image)?
            .into_iter()
            .find(|p| p.0 == ROOT_X86_64 && p.1 == format!("hearth_{}", self.a))
            .ok_or("no slot A in the image")?;
        let (off, len) = (slot.2 * 512, (slot.3 - slot.2 + 1) * 512);
        Ok((off, len, super::slot_digest(&self.image, off, len)?))
    }

    /// The build's release artifacts (next to the image).
    pub fn artifacts(&self) -> PathBuf {
        self.image.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// `image/release-version`: release `new` with the slot content of `from`'s `version`, in
    /// `work/releases/new`.
    pub fn derive(&self, from: &Path, version: &str, new: &str) -> Result<PathBuf, Error> {
        let out = self.work.join("releases").join(new);
        let t = Instant::now();
        script(
            "release-version",
            &[
                "--from".as_ref(),
                from.as_os_str(),
                "--version".as_ref(),
                version.as_ref(),
                "--new-version".as_ref(),
                new.as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ],
        )?;
        println!("release {new} derived from {version} in {:.1} s", t.elapsed().as_secs_f64());
        Ok(out)
    }

    /// `image/release-variant --kind KIND` of the release `version` in `dir`.
    pub fn variant(&self, dir: &Path, version: &str, kind: &str) -> Result<PathBuf, Error> {
        let out = self.work.join("releases").join(format!("{version}-{kind}"));
        super::release_variant(dir, version, kind, &out)?;
        Ok(out)
    }

    /// Sign release `version` from `artifacts` into the served repository (channel `stable`).
    pub fn sign(&self, artifacts: &Path, version: &str) -> Result<(), Error> {
        let spec = SignSpec {
            artifacts: artifacts.to_path_buf(),
            version: version.parse::<ReleaseVersion>()?,
            channel: "stable".into(),
            keys: self.keys.clone(),
            out: self.repo.clone(),
            expires: days_from_now(7),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let report = rt.block_on(sign_release(&spec))?;
        println!(
            "signed {version} (metadata version {}, {} releases listed)",
            report.metadata_version, report.releases
        );
        Ok(())
    }

    /// Start QEMU on the disk.
    pub fn start(&self) -> Result<Vm, Error> {
        Ok(Vm::start(&self.config)?)
    }

    /// Wait for this boot's `HEARTH-BOOT-CHECK` line (from console line `from` on).
    pub fn boot_check(&self, vm: &mut Vm, from: usize, what: &str) -> Result<Line, Error> {
        Ok(vm.wait_for_from(from, what, self.timeout, |l| l.contains("HEARTH-BOOT-CHECK "))?)
    }

    /// Wait until the fleet lists the node online with a heartbeat; its id.
    pub fn online(&self, vm: &Vm) -> Result<String, Error> {
        Ok(self.fleet.wait_online(vm, Duration::from_secs(300))?.id)
    }

    /// Run `hearth-agent update apply --reboot ARGS` in the guest's root shell and wait until it
    /// returns; its exit code and the console mark after it.
    pub fn apply(&self, vm: &mut Vm, args: &str) -> Result<(i32, usize), Error> {
        let from = vm.mark();
        vm.shell(&format!(
            "hearth-agent update apply --reboot {args} > /dev/ttyS0 2>&1; echo \"HEARTH-TEST-APPLY rc=$?\" > /dev/ttyS0"
        ))?;
        let line = vm.wait_for_from(from, "update apply to return", self.timeout, |l| {
            // Not the shell's echo of the command on ttyS1.
            !l.starts_with("ttyS1:") && l.contains("HEARTH-TEST-APPLY rc=")
        })?;
        let at = line.text.find("HEARTH-TEST-APPLY").unwrap_or(0);
        let rc = field(&line.text[at..], "rc").and_then(|s| s.parse().ok()).unwrap_or(-1);
        Ok((rc, vm.mark()))
    }

    /// Wait for a fleet event of `kind` whose message contains `text`; all events so far.
    pub fn event(
        &self,
        vm: &Vm,
        kind: &str,
        text: &str,
    ) -> Result<Vec<hearth_proto::fleet::EventView>, Error> {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let events = self.fleet.events()?;
            if events.iter().any(|e| e.kind == kind && e.message.contains(text)) {
                return Ok(events);
            }
            if Instant::now() > deadline {
                let seen: Vec<String> =
                    events.iter().map(|e| format!("{} {}", e.kind, e.message)).collect();
                return Err(format!(
                    "no fleet event {kind} with \"{text}\"; events: {seen:#?}\n{}",
                    vm.tail(40)
                )
                .into());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The root slots on the disk now: (label, first byte, length), in GPT order.
    pub fn slots(&self) -> Result<Vec<(String, u64, u64)>, Error> {
        Ok(gpt(&self.disk)?
            .into_iter()
            .filter(|p| p.0 == ROOT_X86_64)
            .map(|p| (p.1, p.2 * 512, (p.3 - p.2 + 1) * 512))
            .collect())
    }

    /// The file names in the ESP's `EFI/Linux` (mtools' `mdir`, the disk read directly).
    pub fn esp_entries(&self) -> Result<Vec<String>, Error> {
        let esp = gpt(&self.disk)?.into_iter().find(|p| p.0 == ESP).ok_or("no ESP")?;
        let out = std::process::Command::new("mdir")
            .arg("-b")
            .arg("-i")
            .arg(format!("{}@@{}", self.disk.display(), esp.2 * 512))
            .arg("::/EFI/Linux")
            .output()?;
        if !out.status.success() {
            return Err(format!("mdir: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect())
    }
}

/// One update from the running version `from` to `to` (signed already): apply, reboot, trial
/// boot, check, bless; the fleet's events of it in order. Prints each step's time.
pub fn good_update(rig: &Rig, vm: &mut Vm, from: &str, to: &str) -> Result<(), Error> {
    let t = Instant::now();
    let (rc, mark) = rig.apply(vm, "")?;
    if rc != 0 {
        return Err(format!("update apply {from} -> {to} exited {rc}\n{}", vm.tail(40)).into());
    }
    println!("apply {from} -> {to}: downloaded and written in {:.1} s", t.elapsed().as_secs_f64());
    let check = rig.boot_check(vm, mark, &format!("boot check of {to}"))?;
    if !check_passed(&check.text, to) || field(&check.text, "update") != Some("pass") {
        return Err(
            format!("{to}'s trial boot did not pass: {}\n{}", check.text, vm.tail(60)).into()
        );
    }
    println!("{to} booted on trial, boot check passed after {:.1} s", t.elapsed().as_secs_f64());
    // hearth-update-reconcile.service's line (the console status may share the line's start).
    let blessed = vm.wait_for_from(mark, "update state blessed", rig.timeout, |l| {
        !l.starts_with("ttyS1:") && l.contains("update: ")
    })?;
    let at = blessed.text.find("update: ").unwrap_or(0);
    if !blessed.text[at..].starts_with(&format!("update: blessed  target {to}")) {
        return Err(format!("after the bless: {}\n{}", blessed.text, vm.tail(40)).into());
    }
    let floor = vm.wait_for_from(mark, "anti-rollback line", rig.timeout, |l| {
        l.contains("anti-rollback version")
    })?;
    if !floor.text.trim().ends_with(&format!("anti-rollback version {to}")) {
        return Err(format!("anti-rollback not raised to {to}: {}", floor.text).into());
    }
    let events = rig.event(vm, "node.update.blessed", &format!("{from} -> {to}"))?;
    let ours: Vec<_> =
        events.iter().filter(|e| e.message.contains(&format!("{from} -> {to}"))).collect();
    // The session reports the persisted phase at each heartbeat: how many of the steps before
    // the bless it sees depends on their speed, but at least one, and the bless comes last.
    let before = ["downloading", "writing", "installed", "rebooting", "trial"];
    let first_transfer =
        ours.iter().position(|e| before.iter().any(|p| e.kind == format!("node.update.{p}")));
    let bless = ours.iter().position(|e| e.kind == "node.update.blessed");
    match (first_transfer, bless) {
        (Some(d), Some(b)) if d < b => {}
        _ => {
            let seen: Vec<String> =
                ours.iter().map(|e| format!("{} {}", e.kind, e.message)).collect();
            return Err(format!("fleet events of {from} -> {to} out of order: {seen:#?}").into());
        }
    }
    // Consecutive reports of one phase (progress steps) shown once, with their count.
    let kinds: Vec<&str> = ours.iter().map(|e| e.kind.trim_start_matches("node.update.")).collect();
    let phases: Vec<String> = kinds
        .chunk_by(|x, y| x == y)
        .map(|run| match run {
            [one] => one.to_string(),
            _ => format!("{} x{}", run[0], run.len()),
        })
        .collect();
    println!(
        "{from} -> {to}: blessed after {:.1} s; fleet saw {}",
        t.elapsed().as_secs_f64(),
        phases.join(", ")
    );
    Ok(())
}

/// A bad release `version` (signed already; `kind` as in `image/release-variant`) installed on
/// the running `a` with `tries` boot tries: `apply` succeeds, the trial fails, and the machine is
/// back on `a` with a passing boot check; the fleet's `node.update.rolled_back` event for
/// `a -> version` carries a reason containing `reason`. For `no-boot` every try starts a kernel.
/// Returns the kernel starts counted before `a`'s check (the tries plus `a`'s) and the event's
/// message.
pub fn bad_update(
    rig: &Rig,
    vm: &mut Vm,
    a: &str,
    version: &str,
    kind: &str,
    reason: &str,
    tries: u64,
) -> Result<(u64, String), Error> {
    let t = Instant::now();
    let (rc, mark) = rig.apply(vm, &format!("--version {version} --tries {tries}"))?;
    if rc != 0 {
        return Err(format!("{kind}: update apply exited {rc}\n{}", vm.tail(40)).into());
    }
    println!(
        "{kind}: {version} installed with {tries} tries after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Back on A: its boot check passes, and the update check in it records the rollback.
    let back = vm.wait_for_from(
        mark,
        "A's boot check after the fallback",
        rig.timeout * (tries as u32 + 1),
        |l| l.contains("HEARTH-BOOT-CHECK ") && check_passed(l, a),
    )?;
    let lines = vm.lines();
    let back_at = (mark..lines.len()).find(|&i| lines[i].text == back.text).unwrap_or(lines.len());
    let kernels =
        lines[mark..back_at].iter().filter(|l| l.text.contains("Linux version")).count() as u64;
    if kind == "no-boot" && kernels != tries + 1 {
        return Err(format!(
            "{kind}: {kernels} kernel starts before A's check, expected {tries} failed tries + A"
        )
        .into());
    }
    let events = rig.event(vm, "node.update.rolled_back", &format!("{a} -> {version}"))?;
    let rolled = events
        .iter()
        .rev()
        .find(|e| {
            e.kind == "node.update.rolled_back" && e.message.contains(&format!("{a} -> {version}"))
        })
        .map(|e| e.message.clone())
        .unwrap_or_default();
    if !rolled.contains(reason) || !rolled.contains(": ") {
        return Err(format!(
            "{kind}: rollback reported without the expected reason \"{reason}\": {rolled}"
        )
        .into());
    }
    println!(
        "{kind}: back on {a} after {:.1} s; fleet: node.update.rolled_back \"{rolled}\"",
        t.elapsed().as_secs_f64()
    );
    Ok((kernels, rolled))
}

/// A saved running machine ([`Rig::save_machine`]).
pub struct MachineSnapshot {
    /// The disk at the moment of the save.
    pub disk: PathBuf,
    /// QEMU's machine state (`migrate` to a file).
    pub state: PathBuf,
    /// The firmware variables at the moment of the save.
    pub vars: PathBuf,
}

fn copy_sparse(from: &Path, to: &Path) -> Result<(), Error> {
    let st = std::process::Command::new("cp").arg("--sparse=always").arg(from).arg(to).status()?;
    if !st.success() {
        return Err(format!("cp {} {}: {st}", from.display(), to.display()).into());
    }
    Ok(())
}

/// Whether the boot check line passed, on `version`, with the update gate passing, no agent
/// restart.
pub fn check_passed(line: &str, version: &str) -> bool {
    line.contains("HEARTH-BOOT-CHECK OK ")
        && field(line, "version") == Some(version)
        && field(line, "restarts") == Some("0")
}
