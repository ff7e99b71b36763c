//! Rate limit for log lines a peer can trigger at will (refused accesses,
//! refused or evicted handshakes): the first few of each interval are
//! logged, the rest only counted, and the count is reported in one summary
//! line once the interval is over. A hostile or broken peer then costs a
//! handful of lines per interval instead of one per frame.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per interval before counting starts.
pub const LOG_BURST: u32 = 5;
/// Length of a rate-limit interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    /// Start of the current interval (`None` before the first event).
    start: Option<Instant>,
    /// Events logged in the current interval.
    logged: u32,
    /// Events counted but not logged since the last summary.
    suppressed: u64,
}

#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

/// What the caller does with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log the event; first log a summary of `suppressed` earlier events if
    /// that is not 0.
    Log { suppressed: u64 },
    /// Only counted; reported later by a summary.
    Quiet,
}

impl LogLimit {
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self { burst, interval, state: Mutex::new(State { start: None, logged: 0, suppressed: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Three integers updated together under the lock; a panic cannot
        // leave them in a state that matters beyond one log line.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accounts one event at `now`.
    pub fn check(&self, now: Instant) -> Verdict {
        let mut s = self.lock();
        let mut summary = 0;
        if s.start.is_none_or(|t| now.saturating_duration_since(t) >= self.interval) {
            s.start = Some(now);
            s.logged = 0;
            summary = std::mem::take(&mut s.suppressed);
        }
        if s.logged < self.burst {
            s.logged += 1;
            Verdict::Log { suppressed: summary }
        } else {
            s.suppressed += summary + 1;
            Verdict::Quiet
        }
    }

    /// Runs `log` for one event (the caller's `warn` line) if the limit lets
    /// it through, after `summary` with the count of events suppressed since
    /// the last summary, if any.
    pub fn log(&self, summary: impl FnOnce(u64), log: impl FnOnce()) {
        if let Verdict::Log { suppressed } = self.check(Instant::now()) {
            if suppressed > 0 {
                summary(suppressed);
            }
            log();
        }
    }

    /// Runs `summary` if one is due (at once with `force`: the source of
    /// the events is going away).
    pub fn flush(&self, force: bool, summary: impl FnOnce(u64)) {
        let n = self.take_summary(Instant::now(), force);
        if n > 0 {
            summary(n);
        }
    }

    /// The count of suppressed events to report now: when the interval is
    /// over, or at once with `force` (the connection is closing).
    pub fn take_summary(&self, now: Instant, force: bool) -> u64 {
        let mut s = self.lock();
        let due = s.start.is_some_and(|t| now.saturating_duration_since(t) >= self.interval);
        if force || due {
            std::mem::take(&mut s.suppressed)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_few_pass_then_one_summary_per_interval() {
        let l = LogLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..1000).map(|_| l.check(t0)).collect();
        assert!(verdicts[..3].iter().all(|v| *v == Verdict::Log { suppressed: 0 }));
        assert!(verdicts[3..].iter().all(|v| *v == Verdict::Quiet));
        // Not due yet: nothing to report before the interval is over.
        assert_eq!(l.take_summary(t0 + Duration::from_secs(9), false), 0);
        // The first event of the next interval carries the count.
        assert_eq!(l.check(t0 + Duration::from_secs(10)), Verdict::Log { suppressed: 997 });
        assert_eq!(l.check(t0 + Duration::from_secs(10)), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check(t0 + Duration::from_secs(10)), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check(t0 + Duration::from_secs(11)), Verdict::Quiet);
        // A timer-driven or closing summary takes the count exactly once.
        assert_eq!(l.take_summary(t0 + Duration::from_secs(12), true), 1);
        assert_eq!(l.take_summary(t0 + Duration::from_secs(30), true), 0);
    }
}
