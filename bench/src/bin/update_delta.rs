//! Bytes an update downloads for an agent-only change: the whole slot, the slot compressed, and
//! a content-addressed delta in fixed 4 KiB and 64 KiB chunks (the chunks of the new slot that
//! the running slot lacks), to decide whether a delta or chunked format is worth adding
//! (`docs/0009-updates.md`, "Agent-only changes").
//!
//! The two slots are real erofs images: the root partition of a built image (`image/build`) is
//! extracted (`fsck.erofs --extract`) and rebuilt twice with `mkfs.erofs -zlz4hc` (the image's
//! compression) and fixed timestamps and UUID, once as it is and once with `/usr/bin/hearth-agent`
//! replaced by another build of the agent. Both are rebuilt with the same tool so that only the
//! agent differs. Needs `mkfs.erofs`/`fsck.erofs` (erofs-utils) and `zstd`, and root to keep file
//! owners.
//!
//! Run: `cargo run -p hearth-bench --bin update_delta -- --image target/image/ci/hearth_0.1.0.raw
//! --agent target/release/hearth-agent` (docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::collections::HashSet;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use sha2::{Digest, Sha256};

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// A built disk image (GPT, slot A's root partition labelled `hearth_<V>`).
    #[arg(long)]
    image: PathBuf,
    /// The other agent build that replaces `/usr/bin/hearth-agent`.
    #[arg(long)]
    agent: PathBuf,
    /// Work directory (default: a temporary directory under target/).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// `(name, first byte, length)` of each GPT partition.
fn gpt(image: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut f = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let mut hdr = [0u8; 92];
    f.seek(SeekFrom::Start(512))?;
    f.read_exact(&mut hdr)?;
    ensure!(&hdr[..8] == b"EFI PART", "{}: no GPT header at LBA 1", image.display());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let (lba, count, size) = (u64_at(&hdr, 72), u32_at(&hdr, 80), u32_at(&hdr, 84));
    ensure!((128..=4096).contains(&size) && count <= 1024, "implausible GPT entries");
    let mut entries = vec![0u8; count as usize * size as usize];
    f.seek(SeekFrom::Start(lba * 512))?;
    f.read_exact(&mut entries)?;
    let mut out = Vec::new();
    for e in entries.chunks_exact(size as usize) {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        out.push((String::from_utf16_lossy(&name), first * 512, (last + 1 - first) * 512));
    }
    Ok(out)
}

/// Copy the erofs file system (its own length, from the superblock) out of the partition.
fn extract_partition(image: &Path, start: u64, len: u64, out: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::open(image)?;
    let mut sb = [0u8; 64];
    f.seek(SeekFrom::Start(start + 1024))?;
    f.read_exact(&mut sb)?;
    ensure!(sb[..4] == [0xe2, 0xe1, 0xf5, 0xe0], "the root partition is not erofs");
    let blkbits = u32::from(sb[12]);
    let blocks = u64::from(u32::from_le_bytes([sb[36], sb[37], sb[38], sb[39]]));
    let fs_len = (blocks << blkbits).min(len);
    f.seek(SeekFrom::Start(start))?;
    let mut w = std::fs::File::create(out)?;
    std::io::copy(&mut (&mut f).take(fs_len), &mut w)?;
    Ok(fs_len)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let what = format!("{cmd:?}");
    let st = cmd.stdout(Stdio::null()).status().with_context(|| format!("cannot run {what}"))?;
    ensure!(st.success(), "{what} failed: {st}");
    Ok(())
}

fn mkfs(tree: &Path, out: &Path) -> anyhow::Result<u64> {
    run(Command::new("mkfs.erofs")
        .args(["-zlz4hc", "-T0", "-U", "6b1e5a52-8f8e-4c77-9a55-3e2f0b9d1c11"])
        .arg(out)
        .arg(tree))?;
    Ok(std::fs::metadata(out)?.len())
}

fn zstd_len(data: &[u8]) -> anyhow::Result<u64> {
    let mut child = Command::new("zstd")
        .args(["-3", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run zstd")?;
    let mut stdin = child.stdin.take().context("zstd stdin")?;
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = Vec::new();
    child.stdout.take().context("zstd stdout")?.read_to_end(&mut out)?;
    feeder.join().map_err(|_| anyhow::anyhow!("zstd feeder panicked"))??;
    ensure!(child.wait()?.success(), "zstd failed");
    Ok(out.len() as u64)
}

/// Bytes of `new` in `chunk`-byte pieces that `old` does not hold (each distinct piece once),
/// and those pieces concatenated.
fn delta(old: &[u8], new: &[u8], chunk: usize) -> (u64, Vec<u8>) {
    let have: HashSet<[u8; 32]> = old.chunks(chunk).map(|c| Sha256::digest(c).into()).collect();
    let mut sent: HashSet<[u8; 32]> = HashSet::new();
    let mut bytes = Vec::new();
    for c in new.chunks(chunk) {
        let h: [u8; 32] = Sha256::digest(c).into();
        if !have.contains(&h) && sent.insert(h) {
            bytes.extend_from_slice(c);
        }
    }
    (bytes.len() as u64, bytes)
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let base = o.dir.clone().unwrap_or_else(|| PathBuf::from("target"));
    std::fs::create_dir_all(&base)?;
    let tmp = tempfile::tempdir_in(&base).context("temp dir")?;
    let parts = gpt(&o.image)?;
    let Some((label, start, len)) = parts
        .iter()
        .find(|(n, _, _)| n.starts_with("hearth_") && !n.ends_with("_verity") && n != "_empty")
        .cloned()
    else {
        bail!(
            "{}: no root partition labelled hearth_<V> (partitions: {parts:?})",
            o.image.display()
        );
    };
    eprintln!("slot A root: {label}, {len} bytes at {start}");
    let built = tmp.path().join("built.erofs");
    let built_len = extract_partition(&o.image, start, len, &built)?;
    let tree = tmp.path().join("tree");
    run(Command::new("fsck.erofs").arg(format!("--extract={}", tree.display())).arg(&built))?;
    let agent_path = tree.join("usr/bin/hearth-agent");
    let old_agent = std::fs::metadata(&agent_path)
        .with_context(|| format!("{} in the image", agent_path.display()))?
        .len();
    let a = tmp.path().join("a.erofs");
    mkfs(&tree, &a)?;
    std::fs::copy(&o.agent, &agent_path).with_context(|| format!("copy {}", o.agent.display()))?;
    let new_agent = std::fs::read(&agent_path)?;
    let b = tmp.path().join("b.erofs");
    mkfs(&tree, &b)?;
    let (old, new) = (std::fs::read(&a)?, std::fs::read(&b)?);
    let whole = new.len() as u64;
    let whole_z = zstd_len(&new)?;
    let agent_z = zstd_len(&new_agent)?;
    let mib = |b: u64| b as f64 / 1_048_576.0;
    println!(
        "bytes downloaded for an agent-only change ({label}: image erofs {:.1} MiB; agent {:.1} MiB -> {:.1} MiB)",
        mib(built_len),
        mib(old_agent),
        mib(new_agent.len() as u64)
    );
    println!("| transfer | MiB | vs whole slot |");
    println!("|---|---|---|");
    let row = |name: &str, b: u64| {
        println!("| {name} | {:.2} | {:.3} |", mib(b), b as f64 / whole as f64);
    };
    row("whole slot (erofs lz4hc, what is sent today)", whole);
    row("whole slot, zstd -3", whole_z);
    for chunk in [4096usize, 65_536] {
        let (d, bytes) = delta(&old, &new, chunk);
        row(&format!("{} KiB chunks the running slot lacks", chunk / 1024), d);
        row(
            &format!("{} KiB chunks the running slot lacks, zstd -3", chunk / 1024),
            zstd_len(&bytes)?,
        );
    }
    row("the new agent binary alone, zstd -3 (lower bound)", agent_z);
    Ok(())
}
