//! Run a test's body in a fresh process.
//!
//! NVML is process-global, and so is the fake library's simulation: a test that needs its own
//! scenario, or a library that was never initialised, needs its own process. nextest already
//! runs each test in its own process, but plain `cargo test` runs all tests of a binary as
//! threads of one process. [`isolated`] makes both correct: the test re-executes its own test
//! binary with `--exact NAME` and the environment it needs (set before the child starts, so no
//! `set_var` in a threaded process), and the child, recognising itself by [`CHILD_ENV`], runs the
//! body. The parent fails unless the child ran exactly that one test and it passed.

use std::ffi::OsString;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Set in a child to the name of the test it runs.
pub const CHILD_ENV: &str = "HEARTH_HW_TESTS_CHILD";

/// What a child printed.
#[derive(Debug, Clone, Default)]
pub struct ChildOutput {
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Whether this process is the child started for `test`.
pub fn is_child(test: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == test)
}

/// Run `body` in a fresh process running only `test` (the test's full libtest name, e.g. the
/// function name for a test at the top of an integration-test file), with `env` added.
///
/// In the parent, returns the child's output (also echoed, so `--nocapture` shows it); in the
/// child, runs `body` and returns `None`.
pub fn isolated(
    test: &str,
    env: &[(&str, OsString)],
    body: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Option<ChildOutput>> {
    if is_child(test) {
        body()?;
        return Ok(None);
    }
    let out = run_child(test, env)?;
    Ok(Some(out))
}

/// Start the child for `test` and wait for it; fails unless exactly that test ran and passed.
pub fn run_child(test: &str, env: &[(&str, OsString)]) -> anyhow::Result<ChildOutput> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let output = Command::new(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1", "--include-ignored"])
        .env(CHILD_ENV, test)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {} for {test}", exe.display()))?;
    let out = ChildOutput {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    echo(&out);
    if !output.status.success() {
        bail!("the child process running {test} failed ({}); its output is above", output.status);
    }
    if !out.stdout.contains("test result: ok. 1 passed") {
        bail!("the child process did not run exactly the test {test}; its output is above");
    }
    Ok(out)
}

/// Echo a child's output into this process' (captured unless `--nocapture`).
#[allow(clippy::print_stdout, clippy::print_stderr)] // test support: the output is the point
fn echo(out: &ChildOutput) {
    if !out.stdout.is_empty() {
        println!("---- child stdout ----\n{}", out.stdout.trim_end());
    }
    if !out.stderr.is_empty() {
        eprintln!("---- child stderr ----\n{}", out.stderr.trim_end());
    }
}
