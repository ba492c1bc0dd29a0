//! Update apply throughput against `dd`: the same image written to a file on the same disk, by
//! `dd bs=1M conv=fsync` (baseline; also with `oflag=direct`) and by Hearth's apply path: the
//! resumable, length-bounded, SHA-256-checked download from a `file://` repository into the
//! state directory (`update::fetch::Fetcher::download`) followed by the hashed, fsync'd slot write
//! (`update::platform::GptSlotDisk::write_partition`, the real implementation over a file).
//! The apply path reads and writes the image twice (download, then slot) by design: nothing is
//! written to the slot before its hash is known.
//!
//! Run: `cargo run --release -p hearth-bench --bin update_apply -- --mib 512` (docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hearth_agent::command::SystemRunner;
use hearth_agent::update::fetch::Fetcher;
use hearth_agent::update::platform::{GptSlotDisk, SlotDisk, SlotPartition};
use sha2::{Digest, Sha256};

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// Image size, MiB.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Rounds of each (the best round counts).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Directory on the disk to measure (default: a temporary directory under target/).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let base = o.dir.clone().unwrap_or_else(|| std::path::PathBuf::from("target"));
    std::fs::create_dir_all(&base)?;
    let tmp = tempfile::tempdir_in(&base).context("temp dir")?;
    let len = o.mib << 20;
    let src = tmp.path().join("hearth_2.0.root.raw");
    {
        let mut f = std::fs::File::create(&src)?;
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..o.mib {
            for c in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    let sha = {
        use std::io::Read as _;
        let mut f = std::fs::File::open(&src)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        hex::encode(h.finalize())
    };
    let slot = tmp.path().join("slot-b.img");
    let dl = tmp.path().join("download.part");
    let url = url::Url::from_file_path(&src).map_err(|()| anyhow::anyhow!("url"))?;
    let fetcher = Fetcher::new(None, Duration::from_secs(600))?;
    let disk = GptSlotDisk::new(tmp.path().join("disk"), Arc::new(SystemRunner));
    let part = SlotPartition {
        number: 4,
        node: slot.clone(),
        label: "_empty".into(),
        uuid: String::new(),
        size: len,
    };
    let drop_caches = || {
        // Best effort (root only): each round starts from a cold page cache.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    };
    // One timed `dd` of the image onto a fresh slot file, from a cold cache: seconds.
    let dd = |extra: &[&str]| -> anyhow::Result<f64> {
        let _ = std::fs::remove_file(&slot);
        drop_caches();
        let t = Instant::now();
        let st = std::process::Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", slot.display()))
            .args(["bs=1M", "conv=fsync", "status=none"])
            .args(extra)
            .status()?;
        anyhow::ensure!(st.success(), "dd {} failed", extra.join(" "));
        Ok(t.elapsed().as_secs_f64())
    };
    let mut best_dd = f64::MAX;
    let mut best_direct = f64::MAX;
    let mut best_apply = f64::MAX;
    let mut best_write = f64::MAX;
    for _ in 0..o.rounds {
        best_dd = best_dd.min(dd(&[])?);
        // dd bypassing the page cache (O_DIRECT), as a block-device writer might.
        best_direct = best_direct.min(dd(&["oflag=direct"])?);

        let _ = std::fs::remove_file(&slot);
        let _ = std::fs::remove_file(&dl);
        std::fs::File::create(&slot)?;
        drop_caches();
        let t = Instant::now();
        fetcher.download(&url, &dl, len, &sha, &mut |_| {})?;
        let tw = Instant::now();
        let mut f = std::fs::File::open(&dl)?;
        let got = disk.write_partition(&part, &mut f, len, &mut |_| {})?;
        anyhow::ensure!(hex::encode(got) == sha, "slot hash mismatch");
        best_write = best_write.min(tw.elapsed().as_secs_f64());
        best_apply = best_apply.min(t.elapsed().as_secs_f64());
    }
    let mbs = |s: f64| o.mib as f64 / s;
    println!(
        "update apply vs dd, {} MiB image, file on the same disk, best of {}",
        o.mib, o.rounds
    );
    println!("| path | seconds | MiB/s | vs dd |");
    println!("|---|---|---|---|");
    println!("| dd bs=1M conv=fsync | {best_dd:.2} | {:.0} | 1.00x |", mbs(best_dd));
    println!(
        "| dd bs=1M oflag=direct conv=fsync | {best_direct:.2} | {:.0} | {:.2}x |",
        mbs(best_direct),
        best_dd / best_direct
    );
    println!(
        "| hearth slot write only (hashed, fsync) | {best_write:.2} | {:.0} | {:.2}x |",
        mbs(best_write),
        best_dd / best_write
    );
    println!(
        "| hearth apply: download (bounded, hashed, fsync) + slot write | {best_apply:.2} | {:.0} | {:.2}x |",
        mbs(best_apply),
        best_dd / best_apply
    );
    Ok(())
}
