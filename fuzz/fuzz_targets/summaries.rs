//! The offline summary spool parser (disk input, `state.dir/summaries.bin`): never panics,
//! never claims more bytes than it has, and every record it accepts re-encodes inside them.
#![no_main]

use hearth_agent::telemetry::offline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = offline::parse(data) {
        assert!(p.valid_len <= data.len());
        for s in &p.summaries {
            assert!(s.seq < p.next_seq);
        }
    }
});
