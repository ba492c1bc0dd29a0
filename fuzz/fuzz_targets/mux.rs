//! The tunnel multiplexer fed with a peer's bytes (network input): it never panics, a peer can
//! make it buffer at most one window per stream, and whatever it sends back is valid frames.
#![no_main]

use std::time::Instant;

use hearth_proto::frame;
use hearth_proto::mux::{Mux, MuxConfig, Side};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut mux = Mux::new(Side::Node, MuxConfig { max_streams: 16, ..MuxConfig::default() });
    let now = Instant::now();
    let mut pending = Vec::new();
    // Fed in pieces of varying size, as reads from a socket would come.
    for (i, piece) in data.chunks(97).enumerate() {
        pending.extend_from_slice(piece);
        match mux.receive(&pending) {
            Ok(used) => {
                assert!(used <= pending.len());
                pending.drain(..used);
            }
            Err(_) => return,
        }
        let ids: Vec<_> = mux.stream_ids().collect();
        for id in ids {
            let s = mux.stats(id).expect("listed stream");
            assert!(s.recv_buffered as u64 + s.recv_allowed <= s.recv_window);
            if i % 4 == 0 {
                let mut buf = [0u8; 1024];
                let _ = mux.read(id, &mut buf, now);
                let _ = mux.write(id, &buf[..16]);
            } else if i % 4 == 2 {
                // A relay's way: the queue handed over, a buffer queued whole.
                let mut taken = Vec::new();
                let _ = mux.read_vec(id, &mut taken, 4096, now);
                taken.truncate(100);
                let _ = mux.write_vec(id, &mut taken);
            }
        }
        while mux.poll_event().is_some() {}
    }
    let mut out = Vec::new();
    while mux.poll_transmit(&mut out, 1 << 20) {}
    let mut at = 0;
    while let Some((_, _, n)) = frame::decode(&out[at..]).expect("own frames are valid") {
        at += n;
    }
    assert_eq!(at, out.len());
});
