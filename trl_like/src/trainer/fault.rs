//! Fault injection for the crash, resume and NaN tests, compiled only with
//! the `fault-injection` feature (which the test builds turn on): the
//! environment variables below do nothing in a normal build.

/// When the environment variable `var` equals `step`, the process dies on the
/// spot (`abort`, no cleanup — as close to `kill -9` as a process can do to
/// itself, and deterministic). With `TRL_LIKE_CRASH_RANK` set, only the
/// process of that `RANK` dies.
#[cfg(any(test, feature = "fault-injection"))]
pub(crate) fn crash_point(var: &str, step: usize) {
    let rank_matches = match std::env::var("TRL_LIKE_CRASH_RANK") {
        Ok(r) => std::env::var("RANK").ok().as_deref() == Some(r.trim()),
        Err(_) => true,
    };
    if rank_matches
        && std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            == Some(step)
    {
        eprintln!("{var}={step}: aborting on purpose");
        std::process::abort();
    }
}

#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
pub(crate) fn crash_point(_var: &str, _step: usize) {}

/// Whether `TRL_LIKE_NAN_AT_STEP` (a comma-separated list of 1-based steps)
/// poisons the loss of optimizer step `step`.
#[cfg(any(test, feature = "fault-injection"))]
pub(crate) fn nan_at_step(step: usize) -> bool {
    std::env::var("TRL_LIKE_NAN_AT_STEP").is_ok_and(|v| {
        v.split(',')
            .any(|s| s.trim().parse::<usize>().ok() == Some(step))
    })
}

#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
pub(crate) fn nan_at_step(_step: usize) -> bool {
    false
}
