//! Active diagnostics: `dcgmi diag -r N -i GPU -j` (or a configured burn-in command), run only
//! on a quarantined, idle GPU ([`super::engine::Monitor::may_diagnose`]), and its JSON result
//! parsed into a [`DiagReport`].

use std::time::Duration;

use hearth_proto::api::{DiagReport, DiagTest};
use serde_json::Value;

use super::policy::DiagPolicy;
use crate::command::{CommandError, CommandRunner, with_gpu};

/// Why a diagnostic produced no report.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The level is not 1..=4.
    #[error("diagnostic level {level} is outside 1..=4")]
    Level {
        /// The level asked for.
        level: u8,
    },
    /// The tool could not run.
    #[error("GPU {gpu}: diagnostic command failed to run")]
    Run {
        /// The GPU.
        gpu: u32,
        /// Why.
        #[source]
        source: CommandError,
    },
    /// `dcgmi` answered something that is not its JSON result.
    #[error("GPU {gpu}: cannot parse the dcgmi result: {message}")]
    Parse {
        /// The GPU.
        gpu: u32,
        /// What is wrong.
        message: String,
    },
}

/// Parse `dcgmi diag -j` output: `{"DCGM GPU Diagnostic": {"test_categories": [{"category":
/// …, "tests": [{"name": …, "results": [{"gpu_id": "0", "status": "Pass", "info": …}]}]}]}}`.
/// Results of other GPUs are left out.
pub fn parse_dcgmi(text: &str, gpu: u32) -> Result<Vec<DiagTest>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let cats = v
        .get("DCGM GPU Diagnostic")
        .and_then(|d| d.get("test_categories"))
        .and_then(Value::as_array)
        .ok_or("no \"DCGM GPU Diagnostic\".test_categories array")?;
    let mut out = Vec::new();
    for cat in cats {
        let Some(tests) = cat.get("tests").and_then(Value::as_array) else { continue };
        for t in tests {
            let name = t.get("name").and_then(Value::as_str).unwrap_or("?").to_string();
            let Some(results) = t.get("results").and_then(Value::as_array) else { continue };
            for r in results {
                let id = r.get("gpu_id").and_then(|g| {
                    g.as_str()
                        .and_then(|s| s.parse::<u32>().ok())
                        .or_else(|| g.as_u64().and_then(|n| u32::try_from(n).ok()))
                });
                if id.is_some_and(|id| id != gpu) {
                    continue;
                }
                let status =
                    r.get("status").and_then(Value::as_str).unwrap_or("?").to_ascii_lowercase();
                let result = match status.as_str() {
                    "pass" => "pass",
                    "fail" => "fail",
                    "warn" | "warning" => "warn",
                    "skip" | "skipped" | "not run" => "skip",
                    _ => "fail",
                };
                let info = r.get("info").and_then(|i| match i {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(a) => {
                        Some(a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))
                    }
                    _ => None,
                });
                out.push(DiagTest { name: name.clone(), result: result.into(), info });
            }
        }
    }
    if out.is_empty() {
        return Err(format!("no test result for GPU {gpu}"));
    }
    Ok(out)
}

/// Run the diagnostic for `gpu` at `level` (blocking, up to `diag.timeout_s`).
pub fn run(
    runner: &dyn CommandRunner,
    policy: &DiagPolicy,
    gpu: u32,
    level: u8,
) -> Result<DiagReport, DiagError> {
    if !(1..=4).contains(&level) {
        return Err(DiagError::Level { level });
    }
    let timeout = Duration::from_secs(policy.timeout_s);
    if let Some(cmd) = &policy.burn_in_command {
        let argv = with_gpu(cmd, gpu);
        let out = runner.run(&argv, timeout).map_err(|source| DiagError::Run { gpu, source })?;
        let last =
            out.stdout.trim().lines().chain(out.stderr.trim().lines()).last().map(str::to_string);
        return Ok(DiagReport {
            gpu,
            command: argv.join(" "),
            passed: out.success(),
            tests: vec![DiagTest {
                name: "burn-in".into(),
                result: if out.success() { "pass" } else { "fail" }.into(),
                info: last,
            }],
        });
    }
    let argv: Vec<String> = [
        policy.dcgmi.clone(),
        "diag".into(),
        "-r".into(),
        level.to_string(),
        "-i".into(),
        gpu.to_string(),
        "-j".into(),
    ]
    .to_vec();
    let out = runner.run(&argv, timeout).map_err(|source| DiagError::Run { gpu, source })?;
    let tests =
        parse_dcgmi(&out.stdout, gpu).map_err(|message| DiagError::Parse { gpu, message })?;
    let passed = tests.iter().all(|t| t.result != "fail");
    Ok(DiagReport { gpu, command: argv.join(" "), passed, tests })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandOutput;
    use crate::fakes::command::SystemRunner;

    const DCGMI: &str = r#"{"DCGM GPU Diagnostic": {"test_categories": [
      {"category": "Deployment", "tests": [{"name": "Denylist", "results": [{"status": "Pass"}]}]},
      {"category": "Hardware", "tests": [{"name": "Memory", "results": [
         {"gpu_id": "0", "status": "Pass"},
         {"gpu_id": "1", "status": "Fail", "info": ["DBE on row 7"]}]}]}]}}"#;

    #[test]
    fn parses_per_gpu_results() -> Result<(), String> {
        let t0 = parse_dcgmi(DCGMI, 0)?;
        assert_eq!(t0.len(), 2);
        assert!(t0.iter().all(|t| t.result == "pass"));
        let t1 = parse_dcgmi(DCGMI, 1)?;
        assert_eq!(t1[1].result, "fail");
        assert_eq!(t1[1].info.as_deref(), Some("DBE on row 7"));
        assert!(parse_dcgmi("not json", 0).is_err());
        assert!(parse_dcgmi("{}", 0).is_err());
        Ok(())
    }

    #[test]
    fn runs_dcgmi_or_the_burn_in_command() -> Result<(), DiagError> {
        let r = SystemRunner::default();
        r.answer(CommandOutput { status: Some(0), stdout: DCGMI.into(), stderr: String::new() });
        let rep = run(&r, &DiagPolicy::default(), 1, 2)?;
        assert!(!rep.passed);
        assert_eq!(r.calls()[0].join(" "), "dcgmi diag -r 2 -i 1 -j");
        let burn = DiagPolicy {
            burn_in_command: Some(vec!["gpu-burn".into(), "-d".into(), "{gpu}".into()]),
            ..DiagPolicy::default()
        };
        r.answer(CommandOutput { status: Some(0), stdout: "OK\n".into(), stderr: String::new() });
        let rep = run(&r, &burn, 2, 1)?;
        assert!(rep.passed);
        assert_eq!(r.calls()[1].join(" "), "gpu-burn -d 2");
        assert!(matches!(run(&r, &burn, 2, 9), Err(DiagError::Level { level: 9 })));
        Ok(())
    }
}
