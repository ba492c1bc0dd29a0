//! `hearthctl`: see the library.

fn main() -> std::process::ExitCode {
    hearthctl::main()
}
