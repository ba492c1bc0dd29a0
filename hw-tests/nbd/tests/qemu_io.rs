//! QEMU's own NBD client against the server (`qemu-io` from qemu-utils, which `scripts/test`
//! installs): the handshake QEMU speaks, and power cuts made by a crashing client — `qemu-io`'s
//! `abort` command kills the process without closing (so without flushing) the drive.
//!
//! A missing `qemu-io` is a failure that says what to install, never a skip.

use std::path::Path;
use std::process::Command;

use hearth_nbd::{NbdServer, PowerCutDisk};

const SIZE: usize = 4 * 1024 * 1024;

fn qemu_io(sock: &Path, commands: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-t", "writeback"]);
    for cmd in commands {
        c.args(["-c", cmd]);
    }
    c.arg(format!("nbd+unix:///?socket={}", sock.display()));
    c.output()
        .unwrap_or_else(|e| panic!("qemu-io: {e} (install qemu-utils: apt-get install qemu-utils)"))
}

fn setup() -> (tempfile::TempDir, NbdServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; SIZE]).expect("base");
    let disk = PowerCutDisk::open(&base, &dir.path().join("overlay")).expect("disk");
    let srv = NbdServer::start(&dir.path().join("nbd.sock"), disk).expect("start");
    (dir, srv)
}

fn base(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("base.raw")).expect("base")
}

fn wait_cut(srv: &NbdServer, n: u64) {
    for _ in 0..500 {
        if srv.stats().cuts >= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the server did not see the client go");
}

#[test]
fn qemu_clean_exit_flushes_and_keeps_everything() {
    let (dir, srv) = setup();
    let out = qemu_io(srv.path(), &["write -P 0x5a 65536 131072", "read -P 0x5a 65536 131072"]);
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    wait_cut(&srv, 1);
    assert_eq!(srv.stats().lost_sectors, 0, "QEMU flushes before closing");
    assert!(srv.stats().flushes >= 1);
    assert!(base(dir.path())[65536..196608].iter().all(|b| *b == 0x5a));
}

#[test]
fn qemu_crash_loses_unflushed_but_keeps_flushed_and_fua_writes() {
    let (dir, srv) = setup();
    // Flushed, then FUA (-f), then plain; then the client dies without closing the drive.
    let out = qemu_io(
        srv.path(),
        &[
            "write -P 0x22 0 65536",
            "flush",
            "write -f -P 0x33 1048576 4096",
            "write -P 0x44 2097152 65536",
            "abort",
        ],
    );
    assert!(!out.status.success(), "abort should kill qemu-io");
    wait_cut(&srv, 1);
    let b = base(dir.path());
    assert!(b[..65536].iter().all(|x| *x == 0x22), "the flushed write is lost");
    assert!(b[1048576..1052672].iter().all(|x| *x == 0x33), "the FUA write is lost");
    assert!(
        b[2097152..2162688].iter().all(|x| *x == 0x11),
        "the unflushed write survived the crash"
    );
    assert_eq!(srv.stats().lost_sectors, 128);
    // And QEMU reads the disk as the crash left it.
    let out = qemu_io(srv.path(), &["read -P 0x11 2097152 65536", "read -P 0x22 0 65536"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains("Pattern verification failed"), "{stdout}");
}
