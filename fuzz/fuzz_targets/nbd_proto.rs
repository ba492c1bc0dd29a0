//! The NBD power-cut server's wire parsers (bytes from QEMU's NBD client over a socket): never
//! panic; a parsed request encodes back to the same 28 bytes; a parsed option header's length
//! is within the limit; a parsed `NBD_OPT_GO` never claims more bytes than it was given.
#![no_main]

use hearth_nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = proto::parse_request(data) {
        assert_eq!(&r.encode()[..], &data[..proto::REQUEST_LEN]);
    }
    if let Ok(h) = proto::parse_option_header(data) {
        assert!(h.len <= proto::MAX_OPTION_LEN);
    }
    if let Ok(go) = proto::parse_go(data) {
        assert!(4 + go.name.len() + 2 + 2 * go.info.len() <= data.len());
    }
    let _ = proto::parse_client_flags(data);
    let _ = proto::parse_simple_reply(data);
});
