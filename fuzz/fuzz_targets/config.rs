//! The agent's configuration parser (a file on disk): never panics, and what it accepts
//! validates.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/fuzz/agent.toml");
    if let Ok(config) = hearth_agent::config::Config::parse(text, path) {
        assert!(config.validate(path).is_ok());
    }
});
