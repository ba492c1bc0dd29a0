//! Checks on the built `ci` image with `systemd-dissect` (systemd 257 from mkosi's tools tree,
//! through `image/dissect`): the partition table as designed, the system slot read-only, the
//! agent and Hearth's units enabled. `#[ignore]`d: needs `image/build --profile ci` first; run
//! by `.ci/run`. `HEARTH_IMAGE` overrides the image path.

use std::path::{Path, PathBuf};
use std::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

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

/// One partition of the GPT: (type GUID, label, first LBA, last LBA).
type Partition = (String, String, u64, u64);

/// Read the GPT directly (512-byte sectors), independent of systemd's view.
fn gpt(path: &Path) -> Result<Vec<Partition>, Box<dyn std::error::Error>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 92];
    f.seek(SeekFrom::Start(512))?;
    f.read_exact(&mut header)?;
    assert_eq!(&header[..8], b"EFI PART", "no GPT header");
    let u64_at = |b: &[u8], o: usize| -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let u32_at = |b: &[u8], o: usize| -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[o..o + 4]);
        u32::from_le_bytes(a)
    };
    let (entries_lba, count, size) =
        (u64_at(&header, 72), u32_at(&header, 80), u32_at(&header, 84));
    f.seek(SeekFrom::Start(entries_lba * 512))?;
    let mut parts = Vec::new();
    for _ in 0..count {
        let mut e = vec![0u8; size as usize];
        f.read_exact(&mut e)?;
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        // Mixed-endian GUID: first three fields little-endian.
        let g = &e[..16];
        let guid = format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            g[3],
            g[2],
            g[1],
            g[0],
            g[5],
            g[4],
            g[7],
            g[6],
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15]
        );
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        parts.push((guid, String::from_utf16(&name)?, u64_at(&e, 32), u64_at(&e, 40)));
    }
    Ok(parts)
}

const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
const ROOT_VERITY_X86_64: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
const BASIC_DATA: &str = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7";

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

/// `dump.erofs` (tools tree) on slot A's erofs, read in place at its offset in the image: no
/// mount, so no loop partition devices are needed. `None` when the path does not exist.
fn erofs(args: &[&str], path: &str) -> Result<Option<String>, Box<dyn std::error::Error>> {
    let image = image();
    let parts = gpt(&image)?;
    let version = env!("CARGO_PKG_VERSION");
    let slot_a = parts
        .iter()
        .find(|p| p.0 == ROOT_X86_64 && p.1 == format!("hearth_{version}"))
        .ok_or("no slot A")?;
    let out = Command::new(workspace().join("image/dissect"))
        .args(["--run", "dump.erofs"])
        .arg(format!("--offset={}", slot_a.2 * 512))
        .args(args)
        .arg(format!("--path={path}"))
        .arg(std::fs::canonicalize(&image)?)
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    Ok((out.status.success() && stdout.starts_with("Path :")).then_some(stdout))
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
