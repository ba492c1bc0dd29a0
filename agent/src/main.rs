//! `hearth-agent`: see the library's documentation (`hearth_agent`).

fn main() {
    std::process::exit(hearth_agent::cli::main());
}
