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
