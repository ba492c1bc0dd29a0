//! Model check of `PowerCutDisk`: seeded random sequences of writes (plain and FUA), zeroing,
//! flushes, reads and power cuts, against a reference of two byte vectors (what the guest sees,
//! what is durable). After every step the disk reads as the guest view; after every cut it
//! equals the durable view.

use hearth_nbd::PowerCutDisk;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: usize = 256 * 1024;

fn run(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut initial = vec![0u8; SIZE];
    rng.fill(&mut initial[..]);
    std::fs::write(&base, &initial).expect("base");
    let mut disk = PowerCutDisk::open(&base, &dir.path().join("overlay")).expect("open");
    let mut view = initial.clone();
    let mut durable = initial;
    let mut written = vec![false; SIZE / 512];
    let mut cuts = 0;
    for step in 0..steps {
        let op = rng.random_range(0..100);
        let offset = rng.random_range(0..SIZE);
        let len = rng.random_range(1..=(SIZE - offset).min(20_000));
        let fua = rng.random_bool(0.2);
        match op {
            0..=49 => {
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                disk.write(offset as u64, &data, fua).expect("write");
                view[offset..offset + len].copy_from_slice(&data);
                written[offset / 512..=(offset + len - 1) / 512].fill(true);
                if fua {
                    // The whole sectors touched become durable (disk sector granularity).
                    let a = offset / 512 * 512;
                    let b = (offset + len).div_ceil(512) * 512;
                    durable[a..b].copy_from_slice(&view[a..b]);
                    written[a / 512..b / 512].fill(false);
                }
            }
            50..=59 => {
                disk.zero(offset as u64, len as u64, fua).expect("zero");
                view[offset..offset + len].fill(0);
                written[offset / 512..=(offset + len - 1) / 512].fill(true);
                if fua {
                    let a = offset / 512 * 512;
                    let b = (offset + len).div_ceil(512) * 512;
                    durable[a..b].copy_from_slice(&view[a..b]);
                    written[a / 512..b / 512].fill(false);
                }
            }
            60..=74 => {
                disk.flush().expect("flush");
                durable.copy_from_slice(&view);
                written.fill(false);
            }
            75..=84 => {
                let lost = disk.power_cut().expect("cut");
                let expected_lost = written.iter().filter(|w| **w).count() as u64;
                assert_eq!(lost, expected_lost, "seed {seed} step {step}: sectors lost");
                view.copy_from_slice(&durable);
                written.fill(false);
                cuts += 1;
                let mut all = vec![0u8; SIZE];
                disk.read(0, &mut all).expect("read all");
                assert!(
                    all == durable,
                    "seed {seed} step {step}: after a cut the disk is not the flushed state"
                );
            }
            _ => {
                let mut b = vec![0u8; len];
                disk.read(offset as u64, &mut b).expect("read");
                assert!(
                    b == view[offset..offset + len],
                    "seed {seed} step {step}: read {offset}+{len}"
                );
            }
        }
        assert_eq!(
            disk.stats().dirty_sectors,
            written.iter().filter(|w| **w).count() as u64,
            "seed {seed} step {step}: dirty sector count"
        );
    }
    assert!(cuts > 0, "seed {seed}: the sequence had no power cut");
    // The base file itself is the durable state.
    disk.power_cut().expect("final cut");
    assert!(std::fs::read(&base).expect("read base") == durable, "seed {seed}: base file");
}

#[test]
fn random_sequences_match_the_reference_model() {
    for seed in 0..12 {
        run(seed, 300);
    }
}
