//! The server over its socket: the handshake (`NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME`), the
//! commands, power cuts by the handle and by a dropped connection, and a seeded fuzz-ish run of
//! garbage and mutated messages that must end only the offending connection, never the server.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use hearth_nbd::proto::{self, Command, Request};
use hearth_nbd::{NbdServer, PowerCutDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 1024 * 1024;

fn server(dir: &Path) -> NbdServer {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0xaau8; SIZE as usize]).expect("base");
    let disk = PowerCutDisk::open(&base, &dir.join("overlay")).expect("disk");
    NbdServer::start(&dir.join("nbd.sock"), disk).expect("start")
}

struct Client {
    s: UnixStream,
    next: u64,
}

impl Client {
    /// Connect and negotiate with NBD_OPT_GO (or EXPORT_NAME); returns the export size.
    fn connect(path: &Path, go: bool) -> (Client, u64, u16) {
        let mut s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(g, proto::greeting());
        s.write_all(
            &(proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES).to_be_bytes(),
        )
        .expect("flags");
        // An option the server does not offer first: it must say so and carry on.
        option(&mut s, 8, &[]);
        let (_, rep, _) = read_option_reply(&mut s);
        assert_eq!(rep, proto::REP_ERR_UNSUP);
        if go {
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&1u16.to_be_bytes());
            d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
            option(&mut s, proto::OPT_GO, &d);
            let mut size = 0;
            let mut flags = 0;
            let mut saw_block = false;
            loop {
                let (opt, rep, data) = read_option_reply(&mut s);
                assert_eq!(opt, proto::OPT_GO);
                if rep == proto::REP_ACK {
                    break;
                }
                assert_eq!(rep, proto::REP_INFO);
                let kind = u16::from_be_bytes([data[0], data[1]]);
                if kind == proto::INFO_EXPORT {
                    size = u64::from_be_bytes(data[2..10].try_into().expect("size"));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                } else if kind == proto::INFO_BLOCK_SIZE {
                    saw_block = true;
                }
            }
            assert!(saw_block, "block sizes were asked for");
            (Client { s, next: 1 }, size, flags)
        } else {
            option(&mut s, proto::OPT_EXPORT_NAME, b"");
            let mut b = [0u8; 10];
            s.read_exact(&mut b).expect("export");
            let size = u64::from_be_bytes(b[..8].try_into().expect("size"));
            (Client { s, next: 1 }, size, u16::from_be_bytes([b[8], b[9]]))
        }
    }

    fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        let handle = self.next;
        self.next += 1;
        let r = Request { flags, command, handle, offset, len };
        self.s.write_all(&r.encode()).expect("request");
        self.s.write_all(data).expect("payload");
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply");
        let (err, got) = proto::parse_simple_reply(&h).expect("reply header");
        assert_eq!(got, handle);
        let mut body = Vec::new();
        if command == Command::Read && err == 0 {
            body = vec![0u8; len as usize];
            self.s.read_exact(&mut body).expect("read data");
        }
        (err, body)
    }
}

fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("option");
}

fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(u64::from_be_bytes(h[..8].try_into().expect("magic")), proto::OPTION_REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().expect("len")) as usize;
    let mut d = vec![0u8; len];
    s.read_exact(&mut d).expect("option data");
    (
        u32::from_be_bytes(h[8..12].try_into().expect("opt")),
        u32::from_be_bytes(h[12..16].try_into().expect("rep")),
        d,
    )
}

fn base(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("base.raw")).expect("base")
}

#[test]
fn handshake_and_commands_over_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server(dir.path());
    for go in [true, false] {
        let (mut c, size, flags) = Client::connect(srv.path(), go);
        assert_eq!(size, SIZE);
        assert_ne!(flags & proto::TFLAG_SEND_FLUSH, 0);
        assert_ne!(flags & proto::TFLAG_SEND_FUA, 0);
        assert_eq!(c.request(Command::Write, 0, 0, 4, b"abcd").0, 0);
        assert_eq!(c.request(Command::Read, 0, 0, 4, &[]).1, b"abcd");
        assert_eq!(c.request(Command::Flush, 0, 0, 0, &[]).0, 0);
        assert_eq!(c.request(Command::Trim, 0, 512, 512, &[]).0, 0);
        assert_eq!(c.request(Command::Read, 0, 512, 2, &[]).1, [0, 0]);
        // Past the end: EINVAL for a read, ENOSPC for a write (whose payload is still consumed).
        assert_eq!(c.request(Command::Read, 0, SIZE - 2, 4, &[]).0, proto::EINVAL);
        assert_eq!(c.request(Command::Write, 0, SIZE - 2, 4, b"wxyz").0, proto::ENOSPC);
        assert_eq!(c.request(Command::Other(5), 0, 0, 0, &[]).0, proto::ENOTSUP);
        // The connection still works after the errors.
        assert_eq!(c.request(Command::Read, 0, 0, 4, &[]).1, b"abcd");
        c.s.write_all(
            &Request { flags: 0, command: Command::Disc, handle: 99, offset: 0, len: 0 }.encode(),
        )
        .expect("disc");
    }
    assert_eq!(&base(dir.path())[..4], b"abcd", "flushed before DISC");
}

#[test]
fn a_dropped_connection_loses_unflushed_writes_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server(dir.path());
    let (mut c, _, _) = Client::connect(srv.path(), true);
    c.request(Command::Write, 0, 0, 512, &[1u8; 512]);
    c.request(Command::Flush, 0, 0, 0, &[]);
    c.request(Command::Write, 0, 4096, 512, &[2u8; 512]);
    c.request(Command::Write, proto::CMD_FLAG_FUA, 8192, 512, &[3u8; 512]);
    c.request(Command::Write, 0, 12288, 512, &[4u8; 512]);
    drop(c); // QEMU killed
    wait_for(|| srv.stats().cuts == 1);
    let b = base(dir.path());
    assert_eq!(&b[..512], &[1u8; 512][..], "flushed");
    assert_eq!(&b[4096..4608], &[0xaau8; 512][..], "unflushed: lost");
    assert_eq!(&b[8192..8704], &[3u8; 512][..], "FUA: kept");
    assert_eq!(&b[12288..12800], &[0xaau8; 512][..], "unflushed: lost");
    assert_eq!(srv.stats().lost_sectors, 2);
    // The next boot sees the durable state.
    let (mut c, _, _) = Client::connect(srv.path(), true);
    assert_eq!(c.request(Command::Read, 0, 4096, 4, &[]).1, [0xaa; 4]);
    assert_eq!(srv.connections(), 2);
}

#[test]
fn the_handle_cuts_the_power_of_a_live_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server(dir.path());
    let (mut c, _, _) = Client::connect(srv.path(), true);
    c.request(Command::Write, 0, 0, 512, &[9u8; 512]);
    assert_eq!(srv.power_cut().expect("cut"), 1);
    // The client's connection is gone, as the disk would be.
    let mut b = [0u8; 1];
    let r = Request { flags: 0, command: Command::Read, handle: 1, offset: 0, len: 1 };
    let dead = c.s.write_all(&r.encode()).is_err() || c.s.read(&mut b).map_or(true, |n| n == 0);
    assert!(dead, "the connection survived the power cut");
    let mut v = [0u8; 512];
    srv.read(0, &mut v).expect("read");
    assert_eq!(v, [0xaau8; 512]);
}

fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("condition not reached in 5 s");
}

/// Garbage and mutated handshakes and requests: each connection may fail, the server must keep
/// serving (a well-behaved client afterwards still works) and never write outside what a
/// well-formed, acknowledged request asked for.
#[test]
fn garbage_ends_a_connection_not_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = server(dir.path());
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for round in 0..200 {
        let mut s = UnixStream::connect(srv.path()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut valid = Vec::new();
        valid.extend_from_slice(&1u32.to_be_bytes());
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        o.extend_from_slice(&(go.len() as u32).to_be_bytes());
        o.extend_from_slice(&go);
        valid.extend_from_slice(&o);
        let cmd = rng.random_range(0..8u16);
        let len = rng.random_range(0..4096u32);
        let offset = rng.random_range(0..SIZE * 2);
        valid.extend_from_slice(
            &Request {
                flags: rng.random_range(0..4),
                command: Command::Other(cmd),
                handle: round,
                offset,
                len,
            }
            .encode(),
        );
        if cmd == 1 {
            valid.extend((0..len).map(|_| rng.random::<u8>()));
        }
        let mut bytes = if rng.random_bool(0.3) {
            (0..rng.random_range(0..200)).map(|_| rng.random()).collect()
        } else {
            valid
        };
        for _ in 0..rng.random_range(0..4) {
            if !bytes.is_empty() {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
        }
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let (mut c, size, _) = Client::connect(srv.path(), true);
    assert_eq!(size, SIZE);
    assert_eq!(c.request(Command::Write, 0, 0, 4, b"live").0, 0);
    assert_eq!(c.request(Command::Read, 0, 0, 4, &[]).1, b"live");
}
