//! The `dcgmi diag -j` result parser (a program's output): never panics; every result it
//! returns is one of the four outcomes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for gpu in [0, 1, 7] {
        if let Ok(tests) = hearth_agent::health::diag::parse_dcgmi(text, gpu) {
            assert!(!tests.is_empty());
            assert!(tests.iter().all(|t| ["pass", "fail", "warn", "skip"].contains(&t.result.as_str())));
        }
    }
});
