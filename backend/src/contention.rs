//! When an adaptive poller must give its core away.
//!
//! A poller that busy-polls a core another thread wants (a vCPU of a VM on the same node, the
//! guest's frontend, a busy-polling client) starves it: the scheduler shares the core in
//! slices of a millisecond or more, so each of the two waits a whole slice for the other, and
//! a request that needs both (the guest submits, the poller completes) takes a slice pair.
//! Measured before this module: 496 IOPS at QD1 against 101 k for a poller that sleeps on
//! kicks on the same core.
//!
//! The poller cannot see the other thread, but it sees its own **run-queue delay**: the time it
//! was runnable but waiting for its core, which the scheduler keeps for every task (second
//! field of `/proc/thread-self/schedstat`, in ns). Alone on its core a poller has next to none
//! (a kernel thread running for some µs now and then); sharing it with another runnable
//! thread it waits about as long as it runs. It also waits when it is woken (a guest kick)
//! while another thread holds the core: a poller that goes idle and sleeps after each burst
//! never gets preempted while it polls, but each wake-up then waits for the other thread's
//! slice. [`Contention`] turns samples of that counter into a decision: poll on, or stop polling and sleep on guest kicks (as `--poll never` does) for
//! a back-off period, then try polling again. The back-off doubles while polling keeps finding
//! the core contended (so a competitor that stays costs the poller one probe a second, about
//! two scheduler slices) and starts small again once polling stayed uncontended for
//! [`CALM`].
//!
//! [`RunDelay`] reads the counter: one `pread` of a file kept open, about a µs, done every
//! [`SAMPLE_INTERVAL`] of polling.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How often a polling thread reads its run-queue delay.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_millis(1);
/// An observation window: the run-queue delay is compared with the time elapsed since the
/// window began, and a new window begins after this long without contention.
const WINDOW: Duration = Duration::from_millis(4);
/// Less waiting than this in one window is noise (a kernel thread, a timer), never contention.
const WAITED_MIN: Duration = Duration::from_micros(200);
/// Contention: waited at least 1/`WAITED_SHARE_DEN` of the window's elapsed time. A thread that
/// shares the core with another CPU-bound one waits about 1/2 of it.
const WAITED_SHARE_DEN: u32 = 8;
/// First back-off after contention is seen.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest back-off: a competitor that never leaves costs one probe (about two scheduler
/// slices of shared polling) per this long.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Contention seen again less than this long after polling resumed doubles the back-off;
/// later, it starts again from [`BACKOFF_MIN`].
pub(crate) const CALM: Duration = Duration::from_secs(1);

const _: () = assert!(WAITED_MIN.as_nanos() * (WAITED_SHARE_DEN as u128) < WINDOW.as_nanos() * 2);
const _: () = assert!(SAMPLE_INTERVAL.as_nanos() < WINDOW.as_nanos());
const _: () = assert!(BACKOFF_MIN.as_nanos() <= BACKOFF_MAX.as_nanos());

/// What [`Contention::sample`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Keep polling.
    Poll,
    /// Another thread wants the core: stop polling until `backoff` has passed.
    Yield { backoff: Duration },
}

/// Decides, from a polling thread's run-queue delay, when it must stop busy polling. No I/O:
/// fed the time and the counter, so tests can drive it with made-up samples.
#[derive(Debug)]
pub(crate) struct Contention {
    /// Start of the current observation window: when, and the run-queue delay (ns) then.
    window: Option<(Instant, u64)>,
    /// Polling may resume at this instant; `None` when not backing off.
    backoff_until: Option<Instant>,
    /// Length of the last back-off.
    backoff: Duration,
    /// When polling last resumed after a back-off.
    resumed_at: Option<Instant>,
    /// The run-queue delay (ns) when the thread last went to sleep after polling.
    asleep_delay_ns: Option<u64>,
    /// Back-offs since this poller started, for the logs.
    yields: u64,
}

impl Default for Contention {
    fn default() -> Self {
        Self {
            window: None,
            backoff_until: None,
            backoff: Duration::ZERO,
            resumed_at: None,
            asleep_delay_ns: None,
            yields: 0,
        }
    }
}

impl Contention {
    /// Whether the thread may busy-poll at `now`: false while backing off. The first call
    /// after a back-off ends resumes polling (and starts counting towards [`CALM`]).
    pub(crate) fn may_poll(&mut self, now: Instant) -> bool {
        match self.backoff_until {
            Some(until) if now < until => false,
            Some(_) => {
                self.backoff_until = None;
                self.resumed_at = Some(now);
                self.window = None;
                true
            }
            None => true,
        }
    }

    /// The thread starts (or resumes) polling at `now` with `run_delay_ns` waited so far: a new
    /// window begins, so that time spent asleep is never counted. If it slept after polling
    /// (see [`Contention::sleeps`]), the time it waited for its core once woken is judged
    /// first: more than [`WAITED_MIN`] means another thread held the core, and it yields.
    pub(crate) fn begin(&mut self, now: Instant, run_delay_ns: u64) -> Decision {
        if let Some(asleep) = self.asleep_delay_ns.take() {
            if Duration::from_nanos(run_delay_ns.saturating_sub(asleep)) >= WAITED_MIN {
                return self.back_off(now);
            }
        }
        self.window = Some((now, run_delay_ns));
        Decision::Poll
    }

    /// The thread stops polling (idle) and sleeps with `run_delay_ns` waited so far.
    pub(crate) fn sleeps(&mut self, run_delay_ns: u64) {
        self.asleep_delay_ns = Some(run_delay_ns);
        self.window = None;
    }

    /// One sample taken while polling: `run_delay_ns` is the thread's whole run-queue delay so
    /// far. Says whether to go on polling.
    pub(crate) fn sample(&mut self, now: Instant, run_delay_ns: u64) -> Decision {
        let Some((start, start_delay_ns)) = self.window else {
            self.window = Some((now, run_delay_ns));
            return Decision::Poll;
        };
        let elapsed = now.saturating_duration_since(start);
        let waited = Duration::from_nanos(run_delay_ns.saturating_sub(start_delay_ns));
        if waited >= WAITED_MIN && waited * WAITED_SHARE_DEN >= elapsed {
            return self.back_off(now);
        }
        if elapsed >= WINDOW {
            self.window = Some((now, run_delay_ns));
        }
        Decision::Poll
    }

    /// Contention seen at `now`: stop polling for the next back-off.
    fn back_off(&mut self, now: Instant) -> Decision {
        let again_soon = self.resumed_at.is_some_and(|r| now.saturating_duration_since(r) < CALM);
        self.backoff = if again_soon { (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX) } else { BACKOFF_MIN };
        self.backoff_until = Some(now + self.backoff);
        self.resumed_at = None;
        self.window = None;
        self.asleep_delay_ns = None;
        self.yields += 1;
        Decision::Yield { backoff: self.backoff }
    }

    /// Times this thread stopped polling because its core was contended.
    pub(crate) fn yields(&self) -> u64 {
        self.yields
    }
}

/// The calling thread's run-queue delay, read from `/proc/thread-self/schedstat`.
#[derive(Debug)]
pub(crate) struct RunDelay {
    file: File,
}

impl RunDelay {
    /// Opens the counter of the **calling** thread (`thread-self` is resolved now): only that
    /// thread may read it meaningfully. Fails where the kernel keeps no schedstat (no procfs,
    /// or `CONFIG_SCHED_INFO` off, which shows as all zeroes).
    pub(crate) fn open() -> io::Result<Self> {
        let file = File::open("/proc/thread-self/schedstat")?;
        let run_delay = Self { file };
        let (runtime_ns, _) = run_delay.read_both()?;
        if runtime_ns == 0 {
            // A thread that is running has run: the kernel keeps no scheduler statistics.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel keeps no per-task scheduler statistics",
            ));
        }
        Ok(run_delay)
    }

    /// Nanoseconds this thread has waited on a run queue since it started.
    pub(crate) fn read_ns(&self) -> io::Result<u64> {
        self.read_both().map(|(_, delay)| delay)
    }

    fn read_both(&self) -> io::Result<(u64, u64)> {
        let mut buf = [0u8; 80];
        let n = self.file.read_at(&mut buf, 0)?;
        parse_schedstat(&buf[..n])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected schedstat format"))
    }
}

/// `/proc/<task>/schedstat`: "RUNTIME_NS RUN_DELAY_NS TIMESLICES\n"; returns the first two.
fn parse_schedstat(bytes: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut fields = text.split_ascii_whitespace();
    let runtime = fields.next()?.parse().ok()?;
    let delay = fields.next()?.parse().ok()?;
    fields.next()?;
    Some((runtime, delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const US: u64 = 1_000;

    /// Feeds samples every `step` for `samples` steps, the run-queue delay growing by
    /// `waited_per_step_ns` each; returns the first verdict to yield and when.
    fn drive(
        c: &mut Contention,
        t: &mut Instant,
        delay: &mut u64,
        step: Duration,
        waited_per_step_ns: u64,
        samples: u32,
    ) -> Option<(Instant, Duration)> {
        for _ in 0..samples {
            *t += step;
            *delay += waited_per_step_ns;
            if let Decision::Yield { backoff } = c.sample(*t, *delay) {
                return Some((*t, backoff));
            }
        }
        None
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat(b"160104233 263677760 50\n"), Some((160_104_233, 263_677_760)));
        assert_eq!(parse_schedstat(b"0 0 0\n"), Some((0, 0)));
        assert_eq!(parse_schedstat(b"1 2\n"), None);
        assert_eq!(parse_schedstat(b"x 2 3\n"), None);
        assert_eq!(parse_schedstat(b""), None);
    }

    #[test]
    fn a_poller_alone_on_its_core_keeps_polling() {
        let mut c = Contention::default();
        let (mut t, mut delay) = (Instant::now(), 5 * MS);
        assert_eq!(c.begin(t, delay), Decision::Poll);
        // 10 s of 1 ms samples with a kernel thread taking 20 µs every ms: 2 % of the time.
        assert_eq!(drive(&mut c, &mut t, &mut delay, Duration::from_millis(1), 20 * US, 10_000), None);
        // One longer preemption (150 µs) now and then is still noise.
        assert_eq!(drive(&mut c, &mut t, &mut delay, Duration::from_millis(1), 150 * US, 1), None);
        assert_eq!(drive(&mut c, &mut t, &mut delay, Duration::from_millis(1), 0, 1000), None);
        assert_eq!(c.yields(), 0);
        assert!(c.may_poll(t));
    }

    #[test]
    fn sharing_the_core_with_a_busy_thread_yields_then_backs_off_longer() {
        let mut c = Contention::default();
        let (mut t, mut delay) = (Instant::now(), 0);
        assert_eq!(c.begin(t, delay), Decision::Poll);
        // Slices of 1.5 ms: after running one, the poller finds it waited one.
        let slice = Duration::from_micros(1500);
        let start = t;
        let (at, backoff) = drive(&mut c, &mut t, &mut delay, slice, 1500 * US, 10).expect("contention seen");
        assert_eq!(at, start + slice, "seen at the first sample after the wait");
        assert_eq!(backoff, BACKOFF_MIN);
        assert!(!c.may_poll(t));
        assert!(!c.may_poll(t + BACKOFF_MIN - Duration::from_nanos(1)));
        // The competitor stays: every probe sees it again, and the back-off doubles up to the cap.
        let mut expected = BACKOFF_MIN;
        for _ in 0..20 {
            t += expected;
            assert!(c.may_poll(t));
            assert_eq!(c.begin(t, delay), Decision::Poll);
            let (_, backoff) = drive(&mut c, &mut t, &mut delay, slice, 1500 * US, 10).expect("contention seen again");
            expected = (expected * 2).min(BACKOFF_MAX);
            assert_eq!(backoff, expected);
        }
        assert_eq!(c.backoff, BACKOFF_MAX);
        // The competitor leaves: the probe finds the core free and polling goes on.
        t += BACKOFF_MAX;
        assert!(c.may_poll(t));
        assert_eq!(c.begin(t, delay), Decision::Poll);
        assert_eq!(drive(&mut c, &mut t, &mut delay, Duration::from_millis(1), 0, 5000), None);
        // When contention comes back long after, the back-off starts small again.
        let (_, backoff) = drive(&mut c, &mut t, &mut delay, slice, 1500 * US, 10).expect("contention seen");
        assert_eq!(backoff, BACKOFF_MIN);
        assert_eq!(c.yields(), 22);
    }

    #[test]
    fn a_competitor_that_wants_a_quarter_of_the_core_is_yielded_to() {
        let mut c = Contention::default();
        let (mut t, mut delay) = (Instant::now(), 0);
        assert_eq!(c.begin(t, delay), Decision::Poll);
        // 1 ms samples; every 4th, the poller had waited 1 ms.
        let mut yielded = false;
        for i in 0..100u64 {
            t += Duration::from_millis(1);
            if i % 4 == 3 {
                delay += MS;
            }
            if matches!(c.sample(t, delay), Decision::Yield { .. }) {
                yielded = true;
                break;
            }
        }
        assert!(yielded);
    }

    #[test]
    fn time_asleep_is_not_counted() {
        let mut c = Contention::default();
        let t0 = Instant::now();
        assert_eq!(c.begin(t0, 0), Decision::Poll);
        assert_eq!(c.sample(t0 + Duration::from_millis(1), 10 * US), Decision::Poll);
        // The poller slept 5 s on kicks and waited 100 µs for its core when a kick woke it:
        // neither the sleep nor that short wait is contention, nor counts in the next window.
        c.sleeps(10 * US);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.begin(t1, 110 * US), Decision::Poll);
        assert_eq!(c.sample(t1 + Duration::from_millis(1), 120 * US), Decision::Poll);
        // Without begin, the first sample only starts a window.
        let mut fresh = Contention::default();
        assert_eq!(fresh.sample(t1, 50 * MS), Decision::Poll);
        assert_eq!(fresh.sample(t1 + Duration::from_millis(1), 50 * MS + 10 * US), Decision::Poll);
    }

    #[test]
    fn waiting_for_the_core_when_woken_after_polling_yields() {
        let mut c = Contention::default();
        let t0 = Instant::now();
        assert_eq!(c.begin(t0, 0), Decision::Poll);
        // Polled 1 ms without being preempted, went idle and slept; woken by a kick, it waited
        // 20 µs for its core: an idle core, poll on.
        c.sleeps(0);
        let t1 = t0 + Duration::from_millis(3);
        assert_eq!(c.begin(t1, 20 * US), Decision::Poll);
        // Next time, woken while a busy thread held the core, it waited 1.5 ms: yield.
        c.sleeps(20 * US);
        let t2 = t1 + Duration::from_millis(3);
        assert_eq!(c.begin(t2, 1520 * US), Decision::Yield { backoff: BACKOFF_MIN });
        assert!(!c.may_poll(t2));
        // After the back-off, polling resumes; the same again soon doubles the back-off.
        let t3 = t2 + BACKOFF_MIN;
        assert!(c.may_poll(t3));
        assert_eq!(c.begin(t3, 1520 * US), Decision::Poll, "waits while backing off are not judged");
        c.sleeps(1520 * US);
        assert_eq!(c.begin(t3 + Duration::from_millis(3), 3 * MS), Decision::Yield { backoff: 2 * BACKOFF_MIN });
        // A poller that slept without polling first (never, or backing off) is not judged.
        let t4 = t3 + Duration::from_secs(5);
        assert!(c.may_poll(t4));
        assert_eq!(c.begin(t4, 10 * MS), Decision::Poll);
    }

    #[test]
    fn reads_this_threads_run_delay() {
        let Ok(run_delay) = RunDelay::open() else {
            // A kernel without per-task scheduler statistics: nothing to read.
            return;
        };
        let a = run_delay.read_ns().unwrap();
        let b = run_delay.read_ns().unwrap();
        assert!(b >= a);
    }
}
