//! The seed parser (disk, credential or kernel command line input): never panics, and what it
//! accepts round-trips through its TOML form.
#![no_main]

use hearth_fleet_client::seed::Seed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(seed) = Seed::parse(text, "fuzz") {
        assert_eq!(Seed::parse(&seed.to_toml(), "again").ok(), Some(seed));
    }
});
