//! The fleet's one direct OS touchpoint besides sockets and files: a thread's CPU priority
//! ([`crate::liveness`] runs its writer below the session tasks).

/// Set the calling thread's nice value to `nice`, or leave it where it is when it is already
/// that low in priority: this never raises a thread's priority (which would need
/// `CAP_SYS_NICE`). On Linux the nice value belongs to the thread, not the process, so the
/// fleet's other threads keep theirs.
pub fn lower_thread_priority(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let who = libc::id_t::try_from(tid).map_err(|_| std::io::Error::other("negative thread id"))?;
    // getpriority returns the nice value, which may be -1: errno tells an error apart.
    // SAFETY: errno is thread-local; setting it before the call is how getpriority(2) asks to
    // be checked.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority reads the thread's nice value; `who` is this thread's own id.
    let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, who) };
    if current == -1
        && let Some(code) = std::io::Error::last_os_error().raw_os_error()
        && code != 0
    {
        return Err(std::io::Error::from_raw_os_error(code));
    }
    if current >= nice {
        return Ok(());
    }
    // SAFETY: setpriority changes only this thread's nice value (`who` is its own id), to a
    // value at or below its priority, which needs no privilege.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// The nice value of a task (`/proc/self/task/TID` or `/proc/thread-self`): field 19 of
    /// its `stat`.
    pub(crate) fn nice_in(
        task: &std::path::Path,
    ) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
        let stat = std::fs::read_to_string(task.join("stat"))?;
        let after = stat.rsplit_once(')').ok_or("no ')' in stat")?.1;
        Ok(after.split_whitespace().nth(16).ok_or("short stat")?.parse()?)
    }

    fn nice_of_this_thread() -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
        nice_in(std::path::Path::new("/proc/thread-self"))
    }

    #[test]
    fn lowers_this_thread_only_and_never_raises() -> TestResult {
        let outer = nice_of_this_thread()?;
        let target = (outer + 3).min(19);
        std::thread::spawn(move || -> TestResult {
            lower_thread_priority(target)?;
            assert_eq!(nice_of_this_thread()?, target);
            // Asking for a higher priority than the thread has leaves it as it is.
            lower_thread_priority(target - 3)?;
            assert_eq!(nice_of_this_thread()?, target);
            Ok(())
        })
        .join()
        .map_err(|_| "the thread panicked")??;
        assert_eq!(nice_of_this_thread()?, outer, "the calling test thread is unchanged");
        Ok(())
    }
}
