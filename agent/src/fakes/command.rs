//! A [`CommandRunner`] with scripted answers that records each command line.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::command::{CommandError, CommandOutput, CommandRunner};

/// Answers queued outputs in order (then exit 0 with no output); records every call.
#[derive(Debug, Default)]
pub struct SystemRunner {
    answers: Mutex<VecDeque<CommandOutput>>,
    calls: Mutex<Vec<Vec<String>>>,
}

impl SystemRunner {
    /// Queue the next answer.
    pub fn answer(&self, out: CommandOutput) {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).push_back(out);
    }

    /// Every command line run so far.
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl CommandRunner for SystemRunner {
    fn run(&self, argv: &[String], _timeout: Duration) -> Result<CommandOutput, CommandError> {
        if argv.is_empty() {
            return Err(CommandError::Empty);
        }
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).push(argv.to_vec());
        Ok(self.answers.lock().unwrap_or_else(PoisonError::into_inner).pop_front().unwrap_or(
            CommandOutput { status: Some(0), stdout: String::new(), stderr: String::new() },
        ))
    }
}
