//! Host checks: free space and read-only state of filesystems, memory EDAC error counts
//! (`/sys/devices/system/edac`), clock synchronisation (the kernel's `adjtimex` state, what
//! `timedatectl` shows as "System clock synchronized") and reachability of the fleet endpoint.
//!
//! Each OS touchpoint is a method of the narrow [`HostProbe`] trait; [`SystemProbe`] is the real
//! one and `crate::fakes::host::SystemProbe` the fake. [`check_all`] turns readings into
//! [`HostCheck`]s with the thresholds of the policy's `[host]` table (`docs/0003-health.md`).

use std::net::ToSocketAddrs as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::api::{GpuVerdict, HostCheck};

use crate::health::policy::HostPolicy;

/// One filesystem's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStat {
    /// Size, bytes.
    pub total_bytes: u64,
    /// Free for unprivileged users, bytes.
    pub avail_bytes: u64,
    /// Mounted read-only.
    pub read_only: bool,
    /// A read-only image filesystem (erofs, squashfs, iso9660): read-only and full by design,
    /// like the Hearth image's verity-protected system slot; only rw filesystems found read-only
    /// are a failure.
    pub image: bool,
}

/// `statfs` magic numbers of filesystems that are read-only images by construction.
const IMAGE_FS_MAGIC: [i64; 3] =
    [0xE0F5_E1E2 /* erofs */, 0x7371_7368 /* squashfs */, 0x9660];

/// Memory-controller error counts summed over every controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EdacCounts {
    /// Corrected errors.
    pub corrected: u64,
    /// Uncorrected errors.
    pub uncorrected: u64,
}

/// Clock discipline as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockState {
    /// The kernel considers the clock synchronised (no `STA_UNSYNC`).
    pub synced: bool,
    /// The kernel's maximum error estimate, µs.
    pub max_error_us: i64,
}

/// The host's OS touchpoints (blocking).
pub trait HostProbe: Send + Sync + std::fmt::Debug {
    /// `statvfs` of a mount point.
    fn filesystem(&self, path: &Path) -> std::io::Result<FsStat>;
    /// EDAC counts; `None` where the kernel has no EDAC driver loaded.
    fn edac(&self) -> std::io::Result<Option<EdacCounts>>;
    /// Clock state.
    fn clock(&self) -> std::io::Result<ClockState>;
    /// Open a TCP connection to `endpoint` (`host:port`) within `timeout`.
    fn reach(&self, endpoint: &str, timeout: Duration) -> std::io::Result<Duration>;
}

/// The real host.
#[derive(Debug, Clone)]
pub struct SystemProbe {
    edac_root: PathBuf,
}

impl Default for SystemProbe {
    fn default() -> Self {
        Self { edac_root: PathBuf::from("/sys/devices/system/edac") }
    }
}

impl SystemProbe {
    /// A probe reading EDAC under `edac_root` instead of `/sys/devices/system/edac`.
    pub fn with_edac_root(edac_root: PathBuf) -> Self {
        Self { edac_root }
    }
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {:?} is not a count", path.display(), text.trim()),
        )
    })
}

impl HostProbe for SystemProbe {
    fn filesystem(&self, path: &Path) -> std::io::Result<FsStat> {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable `statvfs`.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
        let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `sf` a valid, writable `statfs`.
        let image = unsafe { libc::statfs(c.as_ptr(), &mut sf) } == 0
            && IMAGE_FS_MAGIC.contains(&(sf.f_type as i64));
        let frsize = st.f_frsize as u64;
        Ok(FsStat {
            total_bytes: (st.f_blocks as u64).saturating_mul(frsize),
            avail_bytes: (st.f_bavail as u64).saturating_mul(frsize),
            read_only: st.f_flag & libc::ST_RDONLY != 0,
            image,
        })
    }

    fn edac(&self) -> std::io::Result<Option<EdacCounts>> {
        let mc = self.edac_root.join("mc");
        let entries = match std::fs::read_dir(&mc) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut counts = EdacCounts::default();
        let mut any = false;
        for entry in entries {
            let dir = entry?.path();
            let is_mc =
                dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("mc"));
            if !is_mc {
                continue;
            }
            counts.corrected += read_u64(&dir.join("ce_count"))?;
            counts.uncorrected += read_u64(&dir.join("ue_count"))?;
            any = true;
        }
        Ok(any.then_some(counts))
    }

    fn clock(&self) -> std::io::Result<ClockState> {
        // SAFETY: an all-zero `timex` with `modes = 0` asks `adjtimex` to read, not to set.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: `tx` is a valid, writable `timex`; with `modes == 0` nothing is changed.
        let state = unsafe { libc::adjtimex(&mut tx) };
        if state < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ClockState {
            synced: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
            max_error_us: tx.maxerror,
        })
    }

    fn reach(&self, endpoint: &str, timeout: Duration) -> std::io::Result<Duration> {
        let started = std::time::Instant::now();
        let addr = endpoint.to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{endpoint} has no address"))
        })?;
        std::net::TcpStream::connect_timeout(&addr, timeout)?;
        Ok(started.elapsed())
    }
}

/// What [`check_all`] remembers between rounds (EDAC baseline at start).
#[derive(Debug, Clone, Default)]
pub struct HostBaseline {
    edac: Option<EdacCounts>,
}

fn check(name: &str, verdict: GpuVerdict, detail: String) -> HostCheck {
    HostCheck { name: name.into(), verdict, detail }
}

/// `host:port` of an `https://` URL (port 443 when none is given), for the reachability check;
/// `None` for anything else.
pub fn endpoint_of_url(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next().filter(|a| !a.is_empty())?;
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    Some(if has_port { authority.to_string() } else { format!("{authority}:443") })
}

/// Run every host check. `filesystems` are watched mount points; `endpoint` the fleet
/// endpoint (`None` until the node has a fleet seed: the check is left out).
pub fn check_all(
    probe: &dyn HostProbe,
    policy: &HostPolicy,
    filesystems: &[PathBuf],
    endpoint: Option<&str>,
    baseline: &mut HostBaseline,
) -> Vec<HostCheck> {
    let mut out = Vec::new();
    for fs in filesystems {
        let name = format!("fs:{}", fs.display());
        out.push(match probe.filesystem(fs) {
            Err(e) => check(&name, GpuVerdict::Degraded, format!("cannot stat: {e}")),
            Ok(st) if st.image => {
                check(&name, GpuVerdict::Healthy, "read-only image (by design)".into())
            }
            Ok(st) if st.read_only => check(
                &name,
                GpuVerdict::Failed,
                "mounted read-only (the disk may be failing)".into(),
            ),
            Ok(st) => {
                let pct = if st.total_bytes == 0 {
                    100.0
                } else {
                    st.avail_bytes as f64 * 100.0 / st.total_bytes as f64
                };
                let detail = format!("{pct:.1} % free ({} MiB)", st.avail_bytes >> 20);
                if pct < f64::from(policy.min_free_pct) {
                    check(
                        &name,
                        GpuVerdict::Degraded,
                        format!("{detail}, below {} %", policy.min_free_pct),
                    )
                } else {
                    check(&name, GpuVerdict::Healthy, detail)
                }
            }
        });
    }
    out.push(match probe.edac() {
        Err(e) => check("edac", GpuVerdict::Degraded, format!("cannot read EDAC counts: {e}")),
        Ok(None) => check("edac", GpuVerdict::Healthy, "no EDAC driver loaded".into()),
        Ok(Some(now)) => {
            let base = *baseline.edac.get_or_insert(now);
            let ue = now.uncorrected.saturating_sub(base.uncorrected);
            let ce = now.corrected.saturating_sub(base.corrected);
            if ue > 0 {
                check(
                    "edac",
                    GpuVerdict::Failed,
                    format!("{ue} uncorrected memory errors since start"),
                )
            } else if ce > policy.edac_ce_max {
                check(
                    "edac",
                    GpuVerdict::Degraded,
                    format!(
                        "{ce} corrected memory errors since start (limit {})",
                        policy.edac_ce_max
                    ),
                )
            } else {
                check(
                    "edac",
                    GpuVerdict::Healthy,
                    format!("{ce} corrected, 0 uncorrected since start"),
                )
            }
        }
    });
    out.push(match probe.clock() {
        Err(e) => check("clock", GpuVerdict::Degraded, format!("cannot read the clock state: {e}")),
        Ok(c) if !c.synced => {
            check("clock", GpuVerdict::Degraded, "system clock not synchronised".into())
        }
        Ok(c)
            if c.max_error_us / 1000
                > i64::try_from(policy.clock_max_error_ms).unwrap_or(i64::MAX) =>
        {
            check(
                "clock",
                GpuVerdict::Degraded,
                format!(
                    "clock error up to {} ms (limit {})",
                    c.max_error_us / 1000,
                    policy.clock_max_error_ms
                ),
            )
        }
        Ok(c) => check(
            "clock",
            GpuVerdict::Healthy,
            format!("synchronised, max error {} ms", c.max_error_us / 1000),
        ),
    });
    if let Some(ep) = endpoint {
        out.push(match probe.reach(ep, Duration::from_secs(policy.reach_timeout_s)) {
            Ok(rtt) => check(
                "fleet",
                GpuVerdict::Healthy,
                format!("{ep} reachable in {} ms", rtt.as_millis()),
            ),
            Err(e) => check("fleet", GpuVerdict::Degraded, format!("{ep} unreachable: {e}")),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::host::SystemProbe as FakeProbe;

    fn by_name<'a>(c: &'a [HostCheck], n: &str) -> &'a HostCheck {
        c.iter().find(|c| c.name == n).unwrap_or_else(|| panic!("no check {n} in {c:?}"))
    }

    #[test]
    fn each_host_check_fires_on_its_condition() {
        let p = HostPolicy::default();
        let fake = FakeProbe::default();
        let fs = [PathBuf::from("/"), PathBuf::from("/data"), PathBuf::from("/usr")];
        let mut base = HostBaseline::default();
        let c = check_all(&fake, &p, &fs, Some("fleet:443"), &mut base);
        assert!(c.iter().all(|c| c.verdict == GpuVerdict::Healthy), "{c:?}");

        fake.set_fs(
            "/data",
            FsStat { total_bytes: 100, avail_bytes: 4, read_only: false, image: false },
        );
        fake.set_fs(
            "/",
            FsStat { total_bytes: 100, avail_bytes: 50, read_only: true, image: false },
        );
        // The image's erofs system slot: read-only and full by design, not a failure.
        fake.set_fs(
            "/usr",
            FsStat { total_bytes: 100, avail_bytes: 0, read_only: true, image: true },
        );
        fake.set_edac(Some(EdacCounts { corrected: 500, uncorrected: 0 }));
        fake.set_clock(ClockState { synced: false, max_error_us: 0 });
        fake.set_reachable(false);
        let c = check_all(&fake, &p, &fs, Some("fleet:443"), &mut base);
        assert_eq!(by_name(&c, "fs:/").verdict, GpuVerdict::Failed);
        assert_eq!(by_name(&c, "fs:/usr").verdict, GpuVerdict::Healthy);
        assert_eq!(by_name(&c, "fs:/data").verdict, GpuVerdict::Degraded);
        assert_eq!(by_name(&c, "edac").verdict, GpuVerdict::Degraded);
        assert_eq!(by_name(&c, "clock").verdict, GpuVerdict::Degraded);
        assert_eq!(by_name(&c, "fleet").verdict, GpuVerdict::Degraded);
        fake.set_edac(Some(EdacCounts { corrected: 500, uncorrected: 1 }));
        let c = check_all(&fake, &p, &fs, None, &mut base);
        assert_eq!(by_name(&c, "edac").verdict, GpuVerdict::Failed);
        assert!(c.iter().all(|c| c.name != "fleet"), "no endpoint, no fleet check");
        assert_eq!(endpoint_of_url("https://10.0.2.2:7443/v1").as_deref(), Some("10.0.2.2:7443"));
        assert_eq!(endpoint_of_url("https://fleet.example").as_deref(), Some("fleet.example:443"));
        assert_eq!(endpoint_of_url("https://[::1]:7443").as_deref(), Some("[::1]:7443"));
        assert_eq!(endpoint_of_url("https://[::1]").as_deref(), Some("[::1]:443"));
        assert_eq!(endpoint_of_url("http://x:1"), None);
        assert_eq!(endpoint_of_url("https://"), None);
    }

    #[test]
    fn real_probe_reads_edac_sysfs_and_this_host() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        for (mc, ce, ue) in [("mc0", "3\n", "0\n"), ("mc1", "4\n", "1\n")] {
            std::fs::create_dir_all(dir.path().join("mc").join(mc))?;
            std::fs::write(dir.path().join("mc").join(mc).join("ce_count"), ce)?;
            std::fs::write(dir.path().join("mc").join(mc).join("ue_count"), ue)?;
        }
        let p = SystemProbe::with_edac_root(dir.path().to_path_buf());
        assert_eq!(p.edac()?, Some(EdacCounts { corrected: 7, uncorrected: 1 }));
        let none = SystemProbe::with_edac_root(dir.path().join("absent"));
        assert_eq!(none.edac()?, None);
        let root = p.filesystem(Path::new("/"))?;
        assert!(root.total_bytes > 0 && root.avail_bytes <= root.total_bytes);
        p.clock()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let ep = listener.local_addr()?.to_string();
        p.reach(&ep, Duration::from_secs(2))?;
        drop(listener);
        assert!(p.reach(&ep, Duration::from_secs(2)).is_err());
        Ok(())
    }
}
