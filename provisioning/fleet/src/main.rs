//! `hearth-fleet`: see the library's `cli` module.

fn main() -> std::process::ExitCode {
    hearth_fleet::cli::main()
}
