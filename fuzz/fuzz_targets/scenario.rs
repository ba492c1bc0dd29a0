//! Simulator scenario files (disk): never panic; an accepted scenario builds a node that steps.
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(scenario) = hearth_sim::Scenario::parse(text, Path::new("/fuzz/scenario.toml")) {
        let mut node = hearth_sim::SimNode::new(&scenario);
        node.advance_to(Duration::from_millis(200));
        for gpu in 0..node.gpu_count() {
            let _ = node.sample(gpu);
        }
    }
});
