//! AES-256-GCM on 16 KiB TLS records: aws-lc-rs (the crypto provider Hearth's rustls uses,
//! `hearth_fleet_client::tls::provider`) against ring (the provider before 2026-12-06), sealing
//! and opening in place as a TLS 1.3 record layer does, in one run on this machine's CPU.
//!
//! `cargo run --release -p hearth-bench --bin aead [-- --gib 2 --rounds 3]`; `docs/benchmarks.md`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::Parser;

/// Command-line options
#[derive(Debug, Parser)]
struct Opts {
    /// GiB sealed (and as many opened) per library and round.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    gib: u64,
    /// Rounds, the libraries alternating within each; the table shows each one's best round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

/// The largest TLS record's plaintext.
const RECORD: usize = 16 * 1024;
/// What a TLS 1.3 record's additional data is: its 5-byte header.
const AAD: [u8; 5] = [0x17, 0x03, 0x03, 0x40, 0x11];

/// One library's AES-256-GCM, sealing and opening TLS 1.3 records in place.
trait Aead {
    fn name(&self) -> &'static str;
    /// Seal `buf` in place under record number `seq`, returning the tag.
    fn seal(&self, seq: u64, buf: &mut [u8]) -> anyhow::Result<[u8; 16]>;
    /// Open `buf` (ciphertext then tag) in place under `seq`; the plaintext's length.
    fn open(&self, seq: u64, buf: &mut [u8]) -> anyhow::Result<usize>;
}

fn nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// The two libraries' AEAD APIs have the same names: one implementation for both.
macro_rules! aead_lib {
    ($ty:ident, $krate:ident, $name:literal) => {
        struct $ty($krate::aead::LessSafeKey);

        impl Aead for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn seal(&self, seq: u64, buf: &mut [u8]) -> anyhow::Result<[u8; 16]> {
                use $krate::aead::{Aad, Nonce};
                let tag = self
                    .0
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce(seq)),
                        Aad::from(AAD),
                        buf,
                    )
                    .map_err(|_| anyhow!("{}: seal failed", $name))?;
                tag.as_ref().try_into().with_context(|| format!("{}: tag length", $name))
            }
            fn open(&self, seq: u64, buf: &mut [u8]) -> anyhow::Result<usize> {
                use $krate::aead::{Aad, Nonce};
                self.0
                    .open_in_place(Nonce::assume_unique_for_key(nonce(seq)), Aad::from(AAD), buf)
                    .map(|p| p.len())
                    .map_err(|_| anyhow!("{}: open failed", $name))
            }
        }
    };
}

aead_lib!(Ring, ring, "ring 0.17");
aead_lib!(AwsLc, aws_lc_rs, "aws-lc-rs 1");

/// One round of `records` seals then `records` opens: (seal GB/s, open GB/s). Each open takes a
/// fresh copy of one sealed record (opening decrypts in place) and must authenticate; the time of
/// as many copies alone is subtracted.
fn round(aead: &dyn Aead, records: u64) -> anyhow::Result<(f64, f64)> {
    let mut buf = vec![0x5au8; RECORD];
    let t = Instant::now();
    for seq in 0..records {
        std::hint::black_box(aead.seal(seq, &mut buf)?);
    }
    let seal = t.elapsed().as_secs_f64();
    let mut sealed = vec![0x5au8; RECORD];
    let tag = aead.seal(7, &mut sealed)?;
    sealed.extend_from_slice(&tag);
    let mut work = sealed.clone();
    let t = Instant::now();
    for _ in 0..records {
        work.copy_from_slice(&sealed);
        let n = aead.open(7, &mut work)?;
        anyhow::ensure!(n == RECORD, "{}: opened {n} bytes, sealed {RECORD}", aead.name());
    }
    let open_and_copy = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..records {
        work.copy_from_slice(&sealed);
        std::hint::black_box(&mut work);
    }
    let open = (open_and_copy - t.elapsed().as_secs_f64()).max(f64::MIN_POSITIVE);
    let bytes = (records as usize * RECORD) as f64;
    Ok((bytes / seal / 1e9, bytes / open / 1e9))
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness: {e}"))?;
    let ring_key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
        .map_err(|_| anyhow!("ring: bad key"))?;
    let aws_key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key)
        .map_err(|_| anyhow!("aws-lc-rs: bad key"))?;
    let libs: [&dyn Aead; 2] = [
        &AwsLc(aws_lc_rs::aead::LessSafeKey::new(aws_key)),
        &Ring(ring::aead::LessSafeKey::new(ring_key)),
    ];
    // Each library must open what the other sealed: the same cipher, not just a fast one.
    let mut buf = vec![0x33u8; RECORD];
    let tag = libs[0].seal(1, &mut buf)?;
    buf.extend_from_slice(&tag);
    anyhow::ensure!(libs[1].open(1, &mut buf)? == RECORD, "ring cannot open aws-lc-rs's record");
    let records = opts.gib * (1 << 30) / RECORD as u64;
    let mut best = [(0.0f64, 0.0f64); 2];
    for r in 0..opts.rounds {
        for (i, lib) in libs.iter().enumerate() {
            let (s, o) = round(*lib, records)?;
            eprintln!("round {}: {} seal {s:.2} GB/s, open {o:.2} GB/s", r + 1, lib.name());
            best[i] = (best[i].0.max(s), best[i].1.max(o));
        }
    }
    println!("| library | seal GB/s | open GB/s | seal vs ring | open vs ring |");
    println!("|---|---|---|---|---|");
    for (i, lib) in libs.iter().enumerate() {
        println!(
            "| {} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
            lib.name(),
            best[i].0,
            best[i].1,
            best[i].0 / best[1].0,
            best[i].1 / best[1].1
        );
    }
    Ok(())
}
