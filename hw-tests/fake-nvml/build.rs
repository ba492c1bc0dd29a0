//! Link the cdylib with `-z nodelete`: the fake runs a control-socket thread from inside the
//! library, so a `dlclose` must never unmap its code (nvml-wrapper's `Nvml::shutdown` closes the
//! library it opened).

// Cargo reads build-script instructions from stdout.
#![allow(clippy::print_stdout)]

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
