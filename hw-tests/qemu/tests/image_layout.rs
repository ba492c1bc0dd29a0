//! Checks on the built `ci` image with `systemd-dissect` (systemd 257 from mkosi's tools tree,
//! through `image/dissect`): the partition table as designed, the system slot read-only, the
//! agent and Hearth's units enabled. `#[ignore]`d: needs `image/build --profile ci` first; run
//! by `.ci/run`. `HEARTH_IMAGE` overrides the image path.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{
    BASIC_DATA, ESP, Partition, ROOT_VERITY_X86_64, ROOT_X86_64, TestResult, gpt, workspace,
};

fn image() -> PathBuf {
    std::env::var_os("HEARTH_IMAGE").map(PathBuf::from).unwrap_or_else(|| {
        workspace().join(format!("target/image/ci/hearth_{}.raw", env!("CARGO_PKG_VERSION")))
    })
}

fn dissect(args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let image = image();
    if !image.exists() {
        return Err(
            format!("{} does not exist: run image/build --profile ci", image.display()).into()
        );
    }
    let out = Command::new(workspace().join("image/dissect")).arg(&image).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "image/dissect {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn partition_table_is_as_designed() -> TestResult {
    let version = env!("CARGO_PKG_VERSION");
    let parts = gpt(&image())?;
    let mib = |p: &Partition| (p.3 - p.2 + 1) * 512 / (1024 * 1024);
    let table: Vec<(&str, String, u64)> =
        parts.iter().map(|p| (p.0.as_str(), p.1.clone(), mib(p))).collect();
    assert_eq!(
        table,
        [
            (ESP, "ESP".to_string(), 512),
            (ROOT_X86_64, format!("hearth_{version}"), 2048),
            (ROOT_VERITY_X86_64, format!("hearth_{version}_verity"), 64),
            (ROOT_X86_64, "_empty".to_string(), 2048),
            (ROOT_VERITY_X86_64, "_empty".to_string(), 64),
            (BASIC_DATA, "HEARTH-SEED".to_string(), 16),
        ]
    );
    Ok(())
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn system_slot_is_read_only_erofs_with_verity_and_esp_is_vfat() -> TestResult {
    let json: serde_json::Value = serde_json::from_str(&dissect(&["--json=short"])?)?;
    let mounts = json["mounts"].as_array().ok_or("no mounts")?;
    let by = |d: &str| mounts.iter().find(|m| m["designator"] == d).cloned().unwrap_or_default();
    let root = by("root");
    assert_eq!(root["fstype"], "erofs", "{root}");
    assert_eq!(root["rw"], "ro", "{root}");
    assert_eq!(root["partition_label"], format!("hearth_{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(by("root-verity")["fstype"], "DM_verity_hash");
    assert_eq!(by("esp")["fstype"], "vfat");
    // Only slot A carries a system: the empty slot B is not offered as a root.
    assert_eq!(mounts.iter().filter(|m| m["designator"] == "root").count(), 1);
    assert_eq!(json["useBootableUefi"], true);
    let release = json["osRelease"].as_array().ok_or("no os-release")?;
    assert!(release.iter().any(|l| l == "IMAGE_ID=hearth"));
    assert!(release.iter().any(|l| l == "VERSION_CODENAME=trixie"));
    Ok(())
}

fn erofs(args: &[&str], path: &str) -> Result<Option<String>, Box<dyn std::error::Error>> {
    common::erofs(&image(), &format!("hearth_{}", env!("CARGO_PKG_VERSION")), args, path)
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn agent_and_hearth_units_are_installed_and_enabled() -> TestResult {
    for path in [
        "/usr/bin/hearth-agent",
        "/etc/hearth/agent.toml",
        "/usr/lib/systemd/system/hearth-agent.service",
        "/usr/lib/hearth/hearth-seed",
        "/usr/lib/repart.d/50-data.conf",
        "/usr/lib/systemd/network/89-hearth-dhcp.network",
    ] {
        assert!(erofs(&[], path)?.is_some(), "{path} missing from the image");
    }
    let listing = |dir: &str| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let out = erofs(&["--ls"], dir)?.ok_or(format!("{dir} missing"))?;
        Ok(out.lines().filter_map(|l| l.split_whitespace().nth(2)).map(String::from).collect())
    };
    // Enabled by the preset at build time.
    let multi_user = listing("/etc/systemd/system/multi-user.target.wants")?;
    for unit in [
        "hearth-agent.service",
        "hearth-boot-check.service",
        "hearth-console@tty1.service",
        "hearth-console@ttyS0.service",
        "systemd-networkd.service",
    ] {
        assert!(multi_user.iter().any(|u| u == unit), "{unit} not enabled: {multi_user:?}");
    }
    let sysinit = listing("/etc/systemd/system/sysinit.target.wants")?;
    for unit in ["hearth-seed.service", "systemd-timesyncd.service", "systemd-resolved.service"] {
        assert!(sysinit.iter().any(|u| u == unit), "{unit} not enabled: {sysinit:?}");
    }
    // No first-boot prompt: masked (a link to /dev/null, 9 bytes).
    let firstboot = erofs(&[], "/etc/systemd/system/systemd-firstboot.service")?
        .ok_or("systemd-firstboot is not masked")?;
    assert!(firstboot.contains("Size: 9 ") && firstboot.contains("symlink"), "{firstboot}");
    // No package manager, no compiler.
    for absent in ["/usr/bin/apt-get", "/usr/bin/gcc", "/usr/bin/cc"] {
        assert!(erofs(&[], absent)?.is_none(), "{absent} ships in the image");
    }
    Ok(())
}

/// Files of a release next to the built image (image/build writes them).
fn artifact(suffix: &str) -> PathBuf {
    let image = image();
    let version = env!("CARGO_PKG_VERSION");
    image.with_file_name(format!("hearth_{version}.{suffix}"))
}

/// Compare a file with a byte range of another, in 1 MiB chunks.
fn same_bytes(
    a: &std::path::Path,
    b: &std::path::Path,
    b_offset: u64,
    len: u64,
) -> Result<bool, Box<dyn std::error::Error>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    if fa.metadata()?.len() != len {
        return Ok(false);
    }
    fb.seek(SeekFrom::Start(b_offset))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = len;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn release_artifacts_are_slot_a_and_match_the_uki_roothash() -> TestResult {
    let version = env!("CARGO_PKG_VERSION");
    let image = image();
    let parts = gpt(&image)?;
    let (root, verity, uki) = (artifact("root.raw"), artifact("root-verity.raw"), artifact("efi"));
    for (label, file) in
        [(format!("hearth_{version}"), &root), (format!("hearth_{version}_verity"), &verity)]
    {
        let p = parts.iter().find(|p| p.1 == label).ok_or(format!("no partition {label}"))?;
        let len = (p.3 - p.2 + 1) * 512;
        assert!(
            same_bytes(file, &image, p.2 * 512, len)?,
            "{} is not partition {label}",
            file.display()
        );
    }
    // The hash tree is the data's, and its root is the one the UKI boots.
    let roothash = common::uki_roothash(&uki)?;
    let computed = common::script(
        "verity-roothash",
        &[root.as_os_str(), verity.as_os_str(), std::ffi::OsStr::new(&roothash)],
    )?;
    assert_eq!(computed.trim(), roothash);
    Ok(())
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn bad_release_variants_differ_from_the_good_one_only_in_the_command_line() -> TestResult {
    let version = env!("CARGO_PKG_VERSION");
    let good = image().parent().ok_or("image has no directory")?.to_path_buf();
    let work = hearth_qemu::work_dir("release_variants")?;
    let good_cmdline = common::script("uki-cmdline", &[artifact("efi").as_os_str()])?;
    for (kind, expect) in [
        ("no-boot", "rdinit=/hearth-not-bootable panic=5"),
        ("agent-fails", "systemd.setenv=HEARTH_AGENT_SOCKET="),
        ("no-fleet", "systemd.mask=systemd-networkd.service"),
    ] {
        let out = work.join(kind);
        common::release_variant(&good, version, kind, &out)?;
        for suffix in ["root.raw", "root-verity.raw"] {
            let v = out.join(format!("hearth_{version}.{suffix}"));
            let len = std::fs::metadata(artifact(suffix))?.len();
            assert!(same_bytes(&v, &artifact(suffix), 0, len)?, "{kind}: {suffix} differs");
        }
        let cmdline = common::script(
            "uki-cmdline",
            &[out.join(format!("hearth_{version}.efi")).as_os_str()],
        )?;
        assert!(cmdline.starts_with(good_cmdline.trim()), "{kind}: {cmdline}");
        assert!(cmdline.contains(expect), "{kind}: {cmdline}");
        // The rest of the UKI (kernel, initrd, os-release) is the good one's.
        assert_eq!(
            std::fs::metadata(out.join(format!("hearth_{version}.efi")))?.len(),
            std::fs::metadata(artifact("efi"))?.len()
        );
    }
    let bad = common::script(
        "release-variant",
        &[
            "--from".as_ref(),
            good.as_os_str(),
            "--version".as_ref(),
            "0.0.0-none".as_ref(),
            "--kind".as_ref(),
            "no-boot".as_ref(),
            "--out".as_ref(),
            work.join("x").as_os_str(),
        ],
    );
    assert!(bad.is_err_and(|e| e.to_string().contains("missing")), "a missing release is an error");
    // The copies are 2 GiB sparse files each: not kept after a pass.
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn boot_counting_and_blessing_are_wired() -> TestResult {
    for path in [
        "/usr/lib/systemd/system-generators/systemd-bless-boot-generator",
        "/usr/lib/systemd/system/systemd-bless-boot.service",
        "/usr/lib/systemd/systemd-bless-boot",
        "/usr/lib/systemd/system/boot-complete.target",
        "/usr/lib/systemd/system/hearth-boot-check.service",
        "/usr/lib/systemd/system/hearth-boot-check-failed.service",
        "/usr/lib/hearth/hearth-boot-check",
    ] {
        assert!(erofs(&[], path)?.is_some(), "{path} missing from the image");
    }
    let unit =
        std::fs::read_to_string(workspace().join("image/systemd/hearth-boot-check.service"))?;
    assert!(
        unit.contains("Before=boot-complete.target")
            && unit.contains("Requires=boot-complete.target")
    );
    // However the check fails (its verdict, its timeout, a crash), a trial boot falls back.
    assert!(unit.contains("OnFailure=hearth-boot-check-failed.service"), "{unit}");
    let failed = std::fs::read_to_string(
        workspace().join("image/systemd/hearth-boot-check-failed.service"),
    )?;
    assert!(failed.contains("hearth-agent update fallback"), "{failed}");
    let script = std::fs::read_to_string(workspace().join("image/bin/hearth-boot-check"))?;
    assert!(
        script.contains("hearth-agent update check"),
        "the boot check does not run the update gate"
    );
    assert!(
        script.contains("hearth-agent update fallback"),
        "the boot check does not fall back when the agent never answers"
    );
    Ok(())
}

/// Run a tool of the image tools tree (systemd 257) through `image/dissect --run`; its exit
/// status and stdout + stderr (mkosi's own notes dropped).
fn tools(args: &[&std::ffi::OsStr]) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let out = Command::new(workspace().join("image/dissect")).arg("--run").args(args).output()?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = text.lines().filter(|l| !l.starts_with('‣')).collect::<Vec<_>>().join("\n");
    Ok((out.status.success(), text))
}

/// The image's unit graph, as its own systemd loads it: `systemd-analyze verify` on a copy of
/// the slot's unit directories (`/usr/lib/systemd/system` and `/etc/systemd`, where the preset's
/// links are) and of the programs Hearth's units run (verify checks they are executable). A start job for the default target and for `boot-complete.target` must not meet an
/// ordering cycle: systemd breaks one by deleting a job, and when that job is
/// `boot-complete.target` the boot check never runs (a unit that a target wants is ordered before
/// that target by default, so a unit `WantedBy=multi-user.target` and `After=boot-complete.target`
/// is such a cycle).
#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn unit_graph_has_no_ordering_cycle() -> TestResult {
    let image = std::fs::canonicalize(image())?;
    let root = hearth_qemu::work_dir("unit_graph")?.join("root");
    let policy = "--image-policy=root=verity+signed+unprotected+absent:=unused+absent";
    for dir in
        ["/usr/lib/systemd/system", "/etc/systemd", "/usr/lib/hearth", "/usr/bin/hearth-agent"]
    {
        let to = root.join(dir.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().ok_or("no parent")?)?;
        let (ok, text) = tools(&[
            "systemd-dissect".as_ref(),
            policy.as_ref(),
            "--copy-from".as_ref(),
            image.as_os_str(),
            dir.as_ref(),
            to.as_os_str(),
        ])?;
        assert!(ok && to.exists(), "copying {dir} out of the image: {text}");
    }
    let wants = std::fs::read_dir(root.join("etc/systemd/system/multi-user.target.wants"))?.count();
    assert!(wants > 3, "the copy holds {wants} multi-user.target wants: not the image's");
    let root_arg = format!("--root={}", root.display());
    let (ok, text) = tools(&[
        "systemd-analyze".as_ref(),
        "verify".as_ref(),
        "--man=no".as_ref(),
        root_arg.as_ref(),
        "multi-user.target".as_ref(),
        "boot-complete.target".as_ref(),
        "hearth-update-reconcile.service".as_ref(),
        "hearth-boot-check.service".as_ref(),
        "hearth-boot-check-failed.service".as_ref(),
    ])?;
    assert!(!text.contains("ordering cycle"), "the image's units have an ordering cycle:\n{text}");
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    Ok(())
}
