//! Network changes, so a node that lost its gateway reconnects as soon as its network is back
//! instead of sleeping out its backoff (`docs/0006-tunnel.md`).
//!
//! [`NetWatch`] hands out a `watch` receiver whose value rises at every change. The real one,
//! [`Netlink`], listens on a `NETLINK_ROUTE` socket for the kernel's link, address and route
//! announcements and counts a change when a link, an address or a route is added or changes
//! (`RTM_NEWLINK`, `RTM_NEWADDR`, `RTM_NEWROUTE`); removals alone do not count, since nothing
//! new can be reached after one. The fake of the same name is `crate::fakes::fleet::Netlink`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Reports network changes.
pub trait NetWatch: Send + Sync + std::fmt::Debug {
    /// A receiver whose value rises at every change (starting the watch on first use; needs a
    /// Tokio runtime).
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Wait for the next change; never returns if the watch has stopped.
pub async fn changed(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How a wait before a retry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The subsystem is stopping.
    Cancelled,
    /// The whole delay passed.
    Waited,
    /// The network changed first: retry now, from the start of the schedule.
    NetworkChanged,
}

/// Wait `delay` before a reconnect, cut short by `cancel` or a network change on `net`.
pub async fn wait_retry(
    cancel: &CancellationToken,
    delay: Duration,
    net: &mut watch::Receiver<u64>,
) -> Retry {
    tokio::select! {
        () = cancel.cancelled() => Retry::Cancelled,
        () = tokio::time::sleep(delay) => Retry::Waited,
        () = changed(net) => {
            tracing::info!("network changed: reconnecting now");
            Retry::NetworkChanged
        }
    }
}

/// `RTM_NEWLINK`, `RTM_NEWADDR`, `RTM_NEWROUTE` (linux/rtnetlink.h).
const NEW_TYPES: [u16; 3] = [16, 20, 24];

/// Whether a buffer of netlink messages holds an addition or change of a link, an address or a
/// route. Walks the `nlmsghdr` headers (length u32, type u16, native endian), stopping at the
/// first malformed one.
pub fn announces_change(buf: &[u8]) -> bool {
    let mut at = 0usize;
    while let Some(hdr) = buf.get(at..at.saturating_add(16)) {
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let kind = u16::from_ne_bytes([hdr[4], hdr[5]]);
        if len < 16 || at.saturating_add(len) > buf.len() {
            return false;
        }
        if NEW_TYPES.contains(&kind) {
            return true;
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        at = at.saturating_add(len.saturating_add(3) & !3);
    }
    false
}

/// The kernel's route netlink announcements (the real watch).
#[derive(Debug, Default)]
pub struct Netlink {
    tx: std::sync::OnceLock<watch::Sender<u64>>,
}

impl NetWatch for Netlink {
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx
            .get_or_init(|| {
                let (tx, _) = watch::channel(0u64);
                match open() {
                    Ok(fd) => {
                        tokio::spawn(listen(fd, tx.clone()));
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot watch network changes (netlink): reconnects follow the backoff only"
                    ),
                }
                tx
            })
            .subscribe()
    }
}

/// A `NETLINK_ROUTE` socket (non-blocking) joined to the link, address and route groups.
fn open() -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) has no memory preconditions; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned to us and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain old data, valid when zeroed (family and fields set below).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = (libc::RTMGRP_LINK
        | libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV6_ROUTE) as u32;
    let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `addr` is a live sockaddr_nl of `len` bytes for the duration of the call.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast::<libc::sockaddr>(), len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

async fn listen(fd: OwnedFd, tx: watch::Sender<u64>) {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, which keeps the descriptor open and
    // returns the same one from as_raw_fd until the AsyncFd is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch network changes (netlink)");
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut ready = match fd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "network change watch ended");
                return;
            }
        };
        let mut change = false;
        loop {
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes; the descriptor is
            // owned by `fd` for the whole call.
            let n = unsafe {
                libc::recv(
                    fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                change |= buf.get(..n as usize).is_some_and(announces_change);
                continue;
            }
            if n == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The kernel dropped announcements for us: something changed.
                Some(libc::ENOBUFS) => change = true,
                Some(libc::EINTR) => {}
                _ if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                _ => {
                    tracing::warn!(error = %e, "network change watch ended");
                    return;
                }
            }
        }
        if change {
            tracing::debug!("network changed");
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// No watch: never reports a change.
#[derive(Debug, Default)]
pub struct Never(std::sync::OnceLock<watch::Sender<u64>>);

impl NetWatch for Never {
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.get_or_init(|| watch::channel(0).0).subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend(std::iter::repeat_n(0u8, payload));
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn additions_count_removals_and_garbage_do_not() {
        assert!(announces_change(&msg(20, 8)), "RTM_NEWADDR");
        assert!(announces_change(&msg(24, 12)), "RTM_NEWROUTE");
        assert!(announces_change(&msg(16, 3)), "RTM_NEWLINK");
        assert!(!announces_change(&msg(21, 8)), "RTM_DELADDR");
        assert!(!announces_change(&msg(25, 8)), "RTM_DELROUTE");
        let mut two = msg(25, 5);
        two.extend(msg(20, 8));
        assert!(announces_change(&two), "an addition after an aligned removal");
        let mut bad = msg(20, 8);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(!announces_change(&bad), "a length past the buffer");
        assert!(!announces_change(&[1, 2, 3]));
        assert!(!announces_change(&msg(20, 8)[..15]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_network_change_cuts_a_reconnect_wait_short() {
        let fake = crate::fakes::fleet::Netlink::default();
        let mut net = fake.subscribe();
        let cancel = CancellationToken::new();
        let long = Duration::from_secs(60);
        let t0 = tokio::time::Instant::now();
        assert_eq!(wait_retry(&cancel, Duration::from_millis(10), &mut net).await, Retry::Waited);
        let waiting = tokio::spawn({
            let cancel = cancel.clone();
            async move { wait_retry(&cancel, long, &mut net).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        fake.change();
        assert_eq!(waiting.await.ok(), Some(Retry::NetworkChanged));
        assert!(t0.elapsed() < Duration::from_secs(3), "waited {:?} of 60 s", t0.elapsed());
        let mut net = fake.subscribe();
        cancel.cancel();
        assert_eq!(wait_retry(&cancel, long, &mut net).await, Retry::Cancelled);
    }
}
