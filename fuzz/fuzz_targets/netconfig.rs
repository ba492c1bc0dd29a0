//! The seed's `[network]` parser (a file on disk or a credential) and the networkd renderer:
//! never panics; what it accepts validates, and renders to unit files whose names stay in the
//! output directory and whose lines are all `[Section]`, `Key=value`, comments or blank (nothing
//! from the seed can inject a line or a section).
#![no_main]

use std::path::Path;

use hearth_agent::netconfig::{NetworkSettings, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/fuzz/seed.toml");
    let Ok(Some(settings)) = NetworkSettings::parse_seed(text, path) else { return };
    assert!(settings.validate(path).is_ok());
    for unit in render(&settings) {
        assert!(!unit.name.contains('/') && !unit.name.starts_with('.'), "{}", unit.name);
        for line in unit.text.lines() {
            let ok = line.is_empty()
                || line.starts_with('#')
                || (line.starts_with('[') && line.ends_with(']'))
                || line.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric())
                });
            assert!(ok, "unexpected line {line:?} in {}", unit.name);
        }
    }
});
