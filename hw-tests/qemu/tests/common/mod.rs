//! Helpers shared by the image tests: the workspace, the GPT read directly, `dump.erofs` on a
//! slot in place, and the release-artifact scripts of `image/`.

#![allow(dead_code)] // each test binary uses a part
#![allow(clippy::print_stdout)] // the update rig prints its steps (the tests' output)

pub mod fleet;
pub mod update;

use std::path::{Path, PathBuf};
use std::process::Command;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One partition of the GPT: (type GUID, label, first LBA, last LBA).
pub type Partition = (String, String, u64, u64);

/// Read the GPT directly (512-byte sectors), independent of systemd's view.
pub fn gpt(path: &Path) -> Result<Vec<Partition>, Box<dyn std::error::Error>> {
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

pub const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
pub const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const ROOT_VERITY_X86_64: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
pub const BASIC_DATA: &str = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7";

/// `dump.erofs` (tools tree) on the erofs of the slot labelled `label` in `image`, read in place
/// at its offset: no mount, so no loop partition devices are needed. `None` when the path does
/// not exist.
pub fn erofs(
    image: &Path,
    label: &str,
    args: &[&str],
    path: &str,
) -> Result<Option<String>, Box<dyn std::error::Error>> {
    let parts = gpt(image)?;
    let slot = parts
        .iter()
        .find(|p| p.0 == ROOT_X86_64 && p.1 == label)
        .ok_or(format!("no slot {label}"))?;
    let out = Command::new(workspace().join("image/dissect"))
        .args(["--run", "dump.erofs"])
        .arg(format!("--offset={}", slot.2 * 512))
        .args(args)
        .arg(format!("--path={path}"))
        .arg(std::fs::canonicalize(image)?)
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    Ok((out.status.success() && stdout.starts_with("Path :")).then_some(stdout))
}

/// The contents of a file in the slot (`dump.erofs --cat`).
pub fn erofs_cat(
    image: &Path,
    label: &str,
    path: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let parts = gpt(image)?;
    let slot = parts
        .iter()
        .find(|p| p.0 == ROOT_X86_64 && p.1 == label)
        .ok_or(format!("no slot {label}"))?;
    let out = Command::new(workspace().join("image/dissect"))
        .args(["--run", "dump.erofs", "--cat"])
        .arg(format!("--offset={}", slot.2 * 512))
        .arg(format!("--path={path}"))
        .arg(std::fs::canonicalize(image)?)
        .output()?;
    if !out.status.success() {
        return Err(
            format!("dump.erofs --cat {path}: {}", String::from_utf8_lossy(&out.stderr)).into()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The names in a directory of the slot (`dump.erofs --ls`).
pub fn erofs_ls(
    image: &Path,
    label: &str,
    dir: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let out = erofs(image, label, &["--ls"], dir)?.ok_or(format!("{dir} missing"))?;
    // A header (path, size, inode...), then "NID TYPE FILENAME" and one entry per line.
    Ok(out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("NID TYPE"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|n| *n != "." && *n != "..")
        .map(String::from)
        .collect())
}

/// Run one of `image/`'s scripts; its stdout, or an error with its stderr.
pub fn script(name: &str, args: &[&std::ffi::OsStr]) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new(workspace().join("image").join(name)).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "image/{name} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `image/release-variant`: the bad release `kind` of release `version` in `from`, into `out`.
pub fn release_variant(
    from: &Path,
    version: &str,
    kind: &str,
    out: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    script(
        "release-variant",
        &[
            "--from".as_ref(),
            from.as_os_str(),
            "--version".as_ref(),
            version.as_ref(),
            "--kind".as_ref(),
            kind.as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
    )?;
    Ok(())
}

/// The `roothash=` on a UKI's command line.
pub fn uki_roothash(uki: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let cmdline = script("uki-cmdline", &[uki.as_os_str()])?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("roothash="))
        .map(String::from)
        .ok_or_else(|| format!("no roothash= in {}: {cmdline}", uki.display()).into())
}

/// The disk for one point: a sparse copy of the image, grown to 8 GiB (first boot grows `/var`
/// into it).
pub fn fresh_disk(image: &Path, disk: &Path) -> TestResult {
    let st = Command::new("cp").arg("--sparse=always").arg(image).arg(disk).status()?;
    if !st.success() {
        return Err(format!("cp {} {}: {st}", image.display(), disk.display()).into());
    }
    std::fs::OpenOptions::new().write(true).open(disk)?.set_len(8 << 30)?;
    Ok(())
}

/// SHA-256 of a byte range of a file (`sha256sum` over `dd`'s output would need a pipe).
pub fn slot_digest(
    file: &Path,
    offset: u64,
    len: u64,
) -> Result<String, Box<dyn std::error::Error>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().ok_or("sha256sum stdin")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(1 << 20) as usize;
            f.read_exact(&mut buf[..n])?;
            std::io::Write::write_all(&mut stdin, &buf[..n])?;
            left -= n as u64;
        }
    }
    let out = child.wait_with_output()?;
    Ok(String::from_utf8(out.stdout)?.split_whitespace().next().unwrap_or_default().to_string())
}

/// The ci image under test: `HEARTH_IMAGE`, or the workspace version's build.
pub fn ci_image() -> PathBuf {
    std::env::var_os("HEARTH_IMAGE").map(PathBuf::from).unwrap_or_else(|| {
        workspace().join(format!("target/image/ci/hearth_{}.raw", env!("CARGO_PKG_VERSION")))
    })
}

/// A `u64` from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// SHA-256 of a whole file.
pub fn file_digest(path: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let len = std::fs::metadata(path)?.len();
    slot_digest(path, 0, len)
}
