//! The shell stream's message decoder (network input, `hearth_proto::shell`): bytes in any
//! pieces never panic, the decoder never holds more than one message plus one piece, and decoded
//! messages re-encode to the bytes they came from.
#![no_main]

use hearth_proto::shell::{self, Decoder, ShellMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size; the rest is the stream.
    let Some((first, data)) = data.split_first() else { return };
    let split = usize::from(*first).max(1);
    let mut d = Decoder::default();
    let mut again = Vec::new();
    let mut consumed_ok = true;
    for piece in data.chunks(split) {
        d.push(piece);
        loop {
            match d.next_msg() {
                Ok(Some(ShellMsg::Input(b))) => {
                    assert!(!b.is_empty() && b.len() <= usize::from(u16::MAX));
                    shell::encode_input(&b, &mut again);
                }
                Ok(Some(ShellMsg::Resize { rows, cols })) => {
                    assert!(shell::valid_size(rows, cols));
                    shell::encode_resize(rows, cols, &mut again);
                }
                Ok(None) => break,
                Err(_) => {
                    consumed_ok = false;
                    break;
                }
            }
        }
        if !consumed_ok {
            break;
        }
        assert!(d.buffered() <= shell::HEADER + usize::from(u16::MAX) + piece.len());
    }
    assert_eq!(&again[..], &data[..again.len()]);
});
