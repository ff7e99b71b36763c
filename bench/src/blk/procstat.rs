//! CPU time of a process (all its threads) from `/proc/PID/stat`.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProcStatError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed stat line in {path}: {line:?}")]
    Parse { path: String, line: String },
}

/// utime + stime in clock ticks, from the text of a `/proc/PID/stat` file.
///
/// The command name (field 2) is parenthesised and may itself contain spaces and `)`, so
/// fields are counted from the last `)`. utime and stime are fields 14 and 15, which are
/// the 12th and 13th after the name.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a constant of the running kernel/libc; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // USER_HZ is 100 on every Linux ABI; fall back to it if sysconf reports nonsense.
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

fn cpu_time_of(path: &str) -> Result<Duration, ProcStatError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ProcStatError::Read { path: path.to_string(), source })?;
    let ticks = parse_cpu_ticks(&text)
        .ok_or_else(|| ProcStatError::Parse { path: path.to_string(), line: text.trim_end().to_string() })?;
    let hz = ticks_per_second();
    Ok(Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz))
}

/// User + system CPU time consumed so far by all threads of `pid`.
pub fn process_cpu_time(pid: u32) -> Result<Duration, ProcStatError> {
    cpu_time_of(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time consumed so far by the calling thread.
pub fn thread_cpu_time() -> Result<Duration, ProcStatError> {
    cpu_time_of("/proc/thread-self/stat")
}

/// `nonvoluntary_ctxt_switches` from the text of a `/proc/.../status` file.
pub fn parse_involuntary_switches(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:")).and_then(|v| v.trim().parse().ok())
}

/// How often the calling thread has been preempted so far. A busy-polling thread alone on
/// its core is never preempted; a growing count means something else ran there and the
/// measurement is disturbed.
pub fn thread_preemptions() -> Result<u64, ProcStatError> {
    let path = "/proc/thread-self/status";
    let text =
        std::fs::read_to_string(path).map_err(|source| ProcStatError::Read { path: path.to_string(), source })?;
    parse_involuntary_switches(&text).ok_or_else(|| ProcStatError::Parse {
        path: path.to_string(),
        line: text.lines().last().unwrap_or_default().to_string(),
    })
}

/// Time spent runnable but waiting for a CPU: the second field of a `/proc/.../schedstat`.
pub fn parse_schedstat_wait_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// How long the calling thread has waited on a runqueue so far: the time other tasks held
/// its core while it wanted to run. For a pinned busy-polling thread this is exactly the
/// time the measurement lost to other work.
pub fn thread_runqueue_wait() -> Result<Duration, ProcStatError> {
    let path = "/proc/thread-self/schedstat";
    let text =
        std::fs::read_to_string(path).map_err(|source| ProcStatError::Read { path: path.to_string(), source })?;
    parse_schedstat_wait_ns(&text)
        .map(Duration::from_nanos)
        .ok_or_else(|| ProcStatError::Parse { path: path.to_string(), line: text.trim_end().to_string() })
}

/// Runqueue wait summed over all threads of `pid` (threads that exited are not counted).
pub fn process_runqueue_wait(pid: u32) -> Result<Duration, ProcStatError> {
    let dir = format!("/proc/{pid}/task");
    let read_err = |path: &str| {
        let path = path.to_string();
        move |source| ProcStatError::Read { path, source }
    };
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
        let path = entry.map_err(read_err(&dir))?.path().join("schedstat");
        // A thread may exit between listing and reading; it no longer competes for a core.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns = parse_schedstat_wait_ns(&text).ok_or_else(|| ProcStatError::Parse {
            path: path.display().to_string(),
            line: text.trim_end().to_string(),
        })?;
        total += Duration::from_nanos(ns);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (evil) name) R 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0 99 1 2 3\n";
        assert_eq!(parse_cpu_ticks(line), Some(1234 + 567));
        let plain = "1 (qemu-storage-d) S 0 1 1 0 -1 0 0 0 0 0 7 8 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_cpu_ticks(plain), Some(15));
    }

    #[test]
    fn involuntary_switches_are_read_from_status() {
        let status = "Name:\tblk-bench\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t 345\n";
        assert_eq!(parse_involuntary_switches(status), Some(345));
        assert_eq!(parse_involuntary_switches("Name:\tx\n"), None);
        assert!(thread_preemptions().is_ok());
    }

    #[test]
    fn runqueue_wait_is_the_second_schedstat_field() {
        assert_eq!(parse_schedstat_wait_ns("918602 104055 2\n"), Some(104_055));
        assert_eq!(parse_schedstat_wait_ns("918602"), None);
        assert_eq!(parse_schedstat_wait_ns("1 x 2"), None);
        assert!(thread_runqueue_wait().is_ok());
        assert!(process_runqueue_wait(std::process::id()).unwrap() >= thread_runqueue_wait().unwrap());
    }

    #[test]
    fn truncated_or_garbage_lines_are_rejected() {
        assert_eq!(parse_cpu_ticks(""), None);
        assert_eq!(parse_cpu_ticks("1 (x) R 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("1 (x) R 1 1 1 0 -1 0 0 0 0 0 a b"), None);
    }

    #[test]
    fn own_cpu_time_grows_while_spinning() {
        let before = thread_cpu_time().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Ticks are 10 ms; on a loaded machine the thread may also be descheduled, so spin
        // until the counter moves, bounded by a generous wall-clock limit.
        let after = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let now = thread_cpu_time().unwrap();
            if now > before || start.elapsed() > Duration::from_secs(10) {
                break now;
            }
        };
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(process_cpu_time(std::process::id()).unwrap() >= after);
    }
}
