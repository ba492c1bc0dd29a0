//! [`PowerCutDisk`]: a block device that acknowledges writes at once but makes them durable only
//! when flushed, like a disk with a volatile write cache.
//!
//! Two files of the export's size: the *base* holds what has been made durable (what the disk
//! holds after a power cut), the *overlay* holds written-but-unflushed sectors, with a bitmap of
//! which sectors of the overlay are current. Reads see the overlay over the base.
//! `NBD_CMD_FLUSH` copies every dirty sector into the base; a write with FUA copies its own
//! sectors at once; [`PowerCutDisk::power_cut`] forgets the overlay. Granularity is the 512-byte
//! sector: a write that covers part of a sector makes the whole sector current in the overlay
//! (read-modify-write), so a FUA write of part of a sector persists that whole sector, as a disk
//! writes whole sectors.
//!
//! "Durable" here means "in the base file": the host does not crash in these tests, so the base
//! file's page cache is as good as its disk, and no `fsync` is issued.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The sector size: the unit of the dirty bitmap.
pub const SECTOR: u64 = 512;

/// Zero-fill and copy chunk.
const CHUNK: u64 = 1024 * 1024;

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file could not be opened, read or written.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The base image's size is not a whole number of sectors.
    #[error("{path}: size {size} is not a multiple of {SECTOR}")]
    Unaligned {
        /// The base image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A request reaches past the end of the disk.
    #[error("range {offset}+{len} past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
}

/// Counters of what happened to the disk (for the tests' reports and assertions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Write, trim and write-zeroes requests.
    pub writes: u64,
    /// Of those, with FUA.
    pub fua_writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Power cuts (explicit or by a dropped connection).
    pub cuts: u64,
    /// Sectors lost by power cuts, in all.
    pub lost_sectors: u64,
    /// Sectors written but not yet durable now.
    pub dirty_sectors: u64,
}

/// A disk that keeps unflushed writes in a volatile overlay (see the module documentation).
#[derive(Debug)]
pub struct PowerCutDisk {
    base: File,
    base_path: PathBuf,
    overlay: File,
    overlay_path: PathBuf,
    size: u64,
    dirty: Vec<u64>,
    stats: DiskStats,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io { op, path: path.to_path_buf(), source }
}

impl PowerCutDisk {
    /// Open `base` (read-write; its size is the disk's) and create the overlay file at
    /// `overlay` (sparse, truncated).
    pub fn open(base: &Path, overlay: &Path) -> Result<PowerCutDisk, DiskError> {
        let base_file =
            File::options().read(true).write(true).open(base).map_err(io("open", base))?;
        let size = base_file.metadata().map_err(io("stat", base))?.len();
        if !size.is_multiple_of(SECTOR) {
            return Err(DiskError::Unaligned { path: base.to_path_buf(), size });
        }
        let overlay_file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(overlay)
            .map_err(io("create", overlay))?;
        overlay_file.set_len(size).map_err(io("size", overlay))?;
        let sectors = size / SECTOR;
        Ok(PowerCutDisk {
            base: base_file,
            base_path: base.to_path_buf(),
            overlay: overlay_file,
            overlay_path: overlay.to_path_buf(),
            size,
            dirty: vec![0; sectors.div_ceil(64) as usize],
            stats: DiskStats::default(),
        })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What happened so far.
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Sectors of `[offset, offset + len)` written but not yet durable: what a power cut now
    /// would lose there (the range is clamped to the disk).
    pub fn dirty_in(&self, offset: u64, len: u64) -> u64 {
        let first = offset / SECTOR;
        let end = offset.saturating_add(len).min(self.size).div_ceil(SECTOR);
        if first >= end {
            return 0;
        }
        let (w0, w1) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        let mut n = 0;
        for (w, word) in self.dirty[w0..=w1].iter().enumerate() {
            let mut bits = *word;
            if w == 0 {
                bits &= u64::MAX << (first % 64);
            }
            if w0 + w == w1 && !end.is_multiple_of(64) {
                bits &= u64::MAX >> (64 - end % 64);
            }
            n += u64::from(bits.count_ones());
        }
        n
    }

    fn is_dirty(&self, sector: u64) -> bool {
        self.dirty[(sector / 64) as usize] & (1 << (sector % 64)) != 0
    }

    fn set_dirty(&mut self, sector: u64) {
        let w = &mut self.dirty[(sector / 64) as usize];
        let bit = 1u64 << (sector % 64);
        if *w & bit == 0 {
            *w |= bit;
            self.stats.dirty_sectors += 1;
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange { offset, len, size: self.size }),
        }
    }

    /// Read `buf.len()` bytes at `offset`: what the guest wrote last, durable or not.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let sector = pos / SECTOR;
            let dirty = self.is_dirty(sector);
            // Extend the run while sectors have the same state.
            let mut run_end = ((sector + 1) * SECTOR).min(end);
            while run_end < end && self.is_dirty(run_end / SECTOR) == dirty {
                run_end = ((run_end / SECTOR + 1) * SECTOR).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if dirty {
                self.overlay.read_exact_at(dst, pos).map_err(io("read", &self.overlay_path))?;
            } else {
                self.base.read_exact_at(dst, pos).map_err(io("read", &self.base_path))?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Write `data` at `offset`, acknowledged at once; durable only after [`flush`] or if `fua`.
    ///
    /// [`flush`]: PowerCutDisk::flush
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        self.check(offset, data.len() as u64)?;
        self.stats.writes += 1;
        self.write_inner(offset, data)?;
        if fua {
            self.stats.fua_writes += 1;
            self.commit_range(offset, data.len() as u64)?;
        }
        Ok(())
    }

    /// Write zeros over `len` bytes at `offset` (`NBD_CMD_TRIM`, `NBD_CMD_WRITE_ZEROES`): like a
    /// write, volatile until flushed (a trim that a power cut undoes leaves the old data, which a
    /// trim allows).
    pub fn zero(&mut self, offset: u64, len: u64, fua: bool) -> Result<(), DiskError> {
        self.check(offset, len)?;
        self.stats.writes += 1;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos);
            self.write_inner(pos, &zeros[..n as usize])?;
            pos += n;
        }
        if fua {
            self.stats.fua_writes += 1;
            self.commit_range(offset, len)?;
        }
        Ok(())
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let first = offset / SECTOR;
        let last = (end - 1) / SECTOR;
        let start = first * SECTOR;
        let stop = (last + 1) * SECTOR;
        if start == offset && stop == end {
            self.overlay.write_all_at(data, offset).map_err(io("write", &self.overlay_path))?;
        } else {
            // Partial sectors at the edges: the current view of the whole sectors, patched.
            let mut buf = vec![0u8; (stop - start) as usize];
            self.read(start, &mut buf[..SECTOR as usize])?;
            let tail = (stop - SECTOR - start) as usize;
            self.read(stop - SECTOR, &mut buf[tail..])?;
            buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
            self.overlay.write_all_at(&buf, start).map_err(io("write", &self.overlay_path))?;
        }
        for s in first..=last {
            self.set_dirty(s);
        }
        Ok(())
    }

    /// Copy the dirty sectors of `[offset, offset+len)` from the overlay into the base.
    fn commit_range(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / SECTOR;
        let last = (offset + len - 1) / SECTOR;
        let mut s = first;
        let mut buf = Vec::new();
        while s <= last {
            if s.is_multiple_of(64) && self.dirty[(s / 64) as usize] == 0 {
                s += 64;
                continue;
            }
            if !self.is_dirty(s) {
                s += 1;
                continue;
            }
            let mut e = s;
            while e < last && self.is_dirty(e + 1) && (e + 1 - s) * SECTOR < CHUNK {
                e += 1;
            }
            let n = ((e + 1 - s) * SECTOR) as usize;
            buf.resize(n, 0);
            self.overlay
                .read_exact_at(&mut buf, s * SECTOR)
                .map_err(io("read", &self.overlay_path))?;
            self.base.write_all_at(&buf, s * SECTOR).map_err(io("write", &self.base_path))?;
            for x in s..=e {
                self.dirty[(x / 64) as usize] &= !(1 << (x % 64));
            }
            self.stats.dirty_sectors -= e + 1 - s;
            s = e + 1;
        }
        Ok(())
    }

    /// Make every acknowledged write durable (`NBD_CMD_FLUSH`).
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.stats.flushes += 1;
        if self.stats.dirty_sectors > 0 {
            self.commit_range(0, self.size)?;
        }
        Ok(())
    }

    /// Power cut: every write not yet durable is lost. Returns the sectors lost.
    pub fn power_cut(&mut self) -> Result<u64, DiskError> {
        let lost = self.stats.dirty_sectors;
        self.dirty.iter_mut().for_each(|w| *w = 0);
        self.stats.dirty_sectors = 0;
        self.stats.cuts += 1;
        self.stats.lost_sectors += lost;
        // Give the overlay's blocks back to the host file system.
        self.overlay.set_len(0).map_err(io("truncate", &self.overlay_path))?;
        self.overlay.set_len(self.size).map_err(io("size", &self.overlay_path))?;
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> (tempfile::TempDir, PowerCutDisk) {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xeeu8; size as usize]).expect("base");
        let d = PowerCutDisk::open(&base, &dir.path().join("overlay")).expect("open");
        (dir, d)
    }

    fn base_bytes(dir: &tempfile::TempDir) -> Vec<u8> {
        std::fs::read(dir.path().join("base.raw")).expect("read base")
    }

    fn read(d: &PowerCutDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read(offset, &mut b).expect("read");
        b
    }

    #[test]
    fn unflushed_write_is_read_back_then_lost_by_a_cut() {
        let (dir, mut d) = disk(64 * 1024);
        d.write(4096, &[1u8; 4096], false).expect("write");
        assert_eq!(read(&d, 4096, 4096), vec![1u8; 4096], "acknowledged data reads back");
        assert_eq!(base_bytes(&dir)[4096], 0xee, "not durable before a flush");
        assert_eq!(d.power_cut().expect("cut"), 8);
        assert_eq!(read(&d, 4096, 4096), vec![0xeeu8; 4096], "gone after the cut");
        assert_eq!(d.stats().lost_sectors, 8);
    }

    #[test]
    fn dirty_in_counts_the_unflushed_sectors_of_a_range() {
        let (_dir, mut d) = disk(256 * 1024);
        // Sectors 10..20 and 100..230 (crossing words), then 400.
        d.write(10 * 512, &[1u8; 10 * 512], false).expect("write");
        d.write(100 * 512, &[1u8; 130 * 512], false).expect("write");
        d.write(400 * 512, &[1u8; 512], false).expect("write");
        assert_eq!(d.dirty_in(0, 256 * 1024), 141);
        assert_eq!(d.dirty_in(0, 256 * 1024), d.stats().dirty_sectors);
        assert_eq!(d.dirty_in(15 * 512, 5 * 512), 5, "the end of the first run");
        assert_eq!(d.dirty_in(20 * 512, 80 * 512), 0, "between the runs");
        assert_eq!(d.dirty_in(128 * 512, 64 * 512), 64, "one whole word");
        assert_eq!(d.dirty_in(101 * 512, 128 * 512), 128, "across three words");
        assert_eq!(d.dirty_in(400 * 512, 1), 1, "a partial sector counts");
        assert_eq!(d.dirty_in(300 * 512, 1 << 40), 1, "clamped to the disk");
        assert_eq!(d.dirty_in(1 << 40, 512), 0, "past the end");
        d.flush().expect("flush");
        assert_eq!(d.dirty_in(0, 256 * 1024), 0);
    }

    #[test]
    fn flushed_write_survives_a_cut() {
        let (dir, mut d) = disk(64 * 1024);
        d.write(0, &[2u8; 1024], false).expect("write");
        d.flush().expect("flush");
        d.write(1024, &[3u8; 512], false).expect("write after flush");
        d.power_cut().expect("cut");
        assert_eq!(read(&d, 0, 1024), vec![2u8; 1024]);
        assert_eq!(read(&d, 1024, 512), vec![0xeeu8; 512], "the write after the flush is lost");
        assert_eq!(&base_bytes(&dir)[..1024], &[2u8; 1024][..]);
    }

    #[test]
    fn fua_write_is_durable_at_once_and_only_it() {
        let (_dir, mut d) = disk(64 * 1024);
        d.write(0, &[4u8; 512], false).expect("plain write");
        d.write(8192, &[5u8; 4096], true).expect("fua write");
        assert_eq!(d.stats().dirty_sectors, 1, "only the plain write is still volatile");
        d.power_cut().expect("cut");
        assert_eq!(read(&d, 8192, 4096), vec![5u8; 4096]);
        assert_eq!(read(&d, 0, 512), vec![0xeeu8; 512]);
    }

    #[test]
    fn unaligned_writes_patch_their_sectors() {
        let (_dir, mut d) = disk(4096);
        d.write(100, &[7u8; 1000], false).expect("write");
        let view = read(&d, 0, 2048);
        assert_eq!(&view[..100], &[0xeeu8; 100][..]);
        assert_eq!(&view[100..1100], &[7u8; 1000][..]);
        assert_eq!(&view[1100..], &[0xeeu8; 948][..]);
        d.flush().expect("flush");
        d.power_cut().expect("cut");
        assert_eq!(read(&d, 0, 2048), view);
    }

    #[test]
    fn zeroing_is_volatile_until_flushed() {
        let (_dir, mut d) = disk(8 * 1024 * 1024);
        d.zero(0, 3 * 1024 * 1024, false).expect("zero");
        assert_eq!(read(&d, 1024 * 1024, 16), vec![0u8; 16]);
        d.power_cut().expect("cut");
        assert_eq!(read(&d, 1024 * 1024, 16), vec![0xeeu8; 16]);
        d.zero(512, 512, true).expect("zero fua");
        d.power_cut().expect("cut");
        assert_eq!(read(&d, 512, 512), vec![0u8; 512]);
    }

    #[test]
    fn out_of_range_and_unaligned_images_are_refused() {
        let (dir, mut d) = disk(4096);
        assert!(matches!(d.write(4000, &[0u8; 200], false), Err(DiskError::OutOfRange { .. })));
        let mut b = [0u8; 8];
        assert!(matches!(d.read(u64::MAX - 2, &mut b), Err(DiskError::OutOfRange { .. })));
        let odd = dir.path().join("odd.raw");
        std::fs::write(&odd, [0u8; 1000]).expect("odd");
        assert!(matches!(
            PowerCutDisk::open(&odd, &dir.path().join("o2")),
            Err(DiskError::Unaligned { size: 1000, .. })
        ));
    }
}
