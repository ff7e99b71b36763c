//! Result of one `blk-bench` run: printed as one line, written as JSON for `bench/plot.py`.

use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyUs {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencyUs {
    /// `None` when nothing was recorded (e.g. the idle workload).
    pub fn from_histogram_ns(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(LatencyUs {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Always "blk-bench"; lets `plot.py` tell our records from fio's.
    pub tool: &'static str,
    pub label: String,
    pub socket: String,
    pub workload: &'static str,
    pub bs_bytes: u64,
    pub qd: u32,
    pub client_cpu: Option<usize>,
    pub server_pid: Option<u32>,
    pub capacity_bytes: u64,
    pub span_bytes: u64,
    pub warmup_s: f64,
    /// Wall time of the measured interval.
    pub elapsed_s: f64,
    /// Requests completed inside the measured interval.
    pub ios: u64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub lat_us: Option<LatencyUs>,
    /// Server user+system CPU over the measured interval, all threads (10 ms resolution).
    pub server_cpu_s: Option<f64>,
    /// Percent of one core.
    pub server_cpu_pct: Option<f64>,
    pub server_cpu_us_per_io: Option<f64>,
    /// The busy-polling client should sit near 100 %; much less means it was preempted.
    pub client_cpu_pct: f64,
    /// Times the client thread was preempted per second of the measured interval. Should be
    /// ~0: anything else means another task shared the client's core during the run.
    pub client_preemptions_per_s: f64,
    /// Percent of the measured interval the client was runnable but waiting for its core
    /// (other tasks ran there). Above a few percent the figures understate the server.
    pub client_runq_wait_pct: f64,
    /// The same for the server, summed over its threads; for a polling server likewise the
    /// share of the interval other tasks took from it.
    pub server_runq_wait_pct: Option<f64>,
}

/// Measurements from which a [`Report`] is derived.
pub struct Measured<'a> {
    pub elapsed: Duration,
    pub ios: u64,
    pub latency_ns: &'a Histogram<u64>,
    pub server_cpu: Option<Duration>,
    pub client_cpu: Duration,
    pub client_preemptions: u64,
    pub client_runq_wait: Duration,
    pub server_runq_wait: Option<Duration>,
}

/// Identity of the run, copied into the report.
pub struct RunInfo {
    pub label: String,
    pub socket: String,
    pub workload: &'static str,
    pub bs_bytes: u64,
    pub qd: u32,
    pub client_cpu: Option<usize>,
    pub server_pid: Option<u32>,
    pub capacity_bytes: u64,
    pub span_bytes: u64,
    pub warmup: Duration,
}

impl Report {
    pub fn new(info: RunInfo, m: &Measured<'_>) -> Self {
        let secs = m.elapsed.as_secs_f64();
        let iops = if secs > 0.0 { m.ios as f64 / secs } else { 0.0 };
        let pct = |cpu: Duration| {
            if secs > 0.0 {
                100.0 * cpu.as_secs_f64() / secs
            } else {
                0.0
            }
        };
        let server_cpu_us_per_io = match m.server_cpu {
            Some(cpu) if m.ios > 0 => Some(cpu.as_secs_f64() * 1e6 / m.ios as f64),
            _ => None,
        };
        Report {
            tool: "blk-bench",
            label: info.label,
            socket: info.socket,
            workload: info.workload,
            bs_bytes: info.bs_bytes,
            qd: info.qd,
            client_cpu: info.client_cpu,
            server_pid: info.server_pid,
            capacity_bytes: info.capacity_bytes,
            span_bytes: info.span_bytes,
            warmup_s: info.warmup.as_secs_f64(),
            elapsed_s: secs,
            ios: m.ios,
            iops,
            mib_per_s: iops * info.bs_bytes as f64 / f64::from(1u32 << 20),
            lat_us: LatencyUs::from_histogram_ns(m.latency_ns),
            server_cpu_s: m.server_cpu.map(|d| d.as_secs_f64()),
            server_cpu_pct: m.server_cpu.map(pct),
            server_cpu_us_per_io,
            client_cpu_pct: pct(m.client_cpu),
            client_runq_wait_pct: pct(m.client_runq_wait),
            server_runq_wait_pct: m.server_runq_wait.map(pct),
            client_preemptions_per_s: if secs > 0.0 { m.client_preemptions as f64 / secs } else { 0.0 },
        }
    }

    pub fn summary_line(&self) -> String {
        let mut s = format!(
            "{label} {wl} bs={bs} qd={qd}: {iops:.0} IOPS {mib:.1} MiB/s",
            label = if self.label.is_empty() { "-" } else { &self.label },
            wl = self.workload,
            bs = self.bs_bytes,
            qd = self.qd,
            iops = self.iops,
            mib = self.mib_per_s,
        );
        if let Some(l) = &self.lat_us {
            s += &format!(" lat_us p50={:.2} p99={:.2} p99.9={:.2}", l.p50, l.p99, l.p999);
        }
        if let Some(pct) = self.server_cpu_pct {
            s += &format!(" server_cpu={pct:.1}%");
        }
        if let Some(us) = self.server_cpu_us_per_io {
            s += &format!(" ({us:.3} us/IO)");
        }
        s += &format!(
            " client_cpu={:.0}% preempted={:.0}/s waited={:.1}%",
            self.client_cpu_pct, self.client_preemptions_per_s, self.client_runq_wait_pct
        );
        if let Some(w) = self.server_runq_wait_pct {
            s += &format!(" server_waited={w:.1}%");
        }
        s
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            label: "t".into(),
            socket: "/s".into(),
            workload: "randread",
            bs_bytes: 4096,
            qd: 32,
            client_cpu: Some(0),
            server_pid: Some(1),
            capacity_bytes: 1 << 30,
            span_bytes: 1 << 30,
            warmup: Duration::from_secs(1),
        }
    }

    #[test]
    fn rates_and_cpu_per_io_are_derived_from_the_interval() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for ns in [1_000u64, 2_000, 3_000, 100_000] {
            h.record(ns).unwrap();
        }
        let r = Report::new(
            info(),
            &Measured {
                elapsed: Duration::from_secs(2),
                ios: 2_000_000,
                latency_ns: &h,
                server_cpu: Some(Duration::from_secs(1)),
                client_cpu: Duration::from_secs(2),
                client_preemptions: 10,
                client_runq_wait: Duration::from_millis(20),
                server_runq_wait: Some(Duration::from_millis(40)),
            },
        );
        assert_eq!(r.iops, 1_000_000.0);
        assert!((r.mib_per_s - 3906.25).abs() < 1e-9);
        assert_eq!(r.server_cpu_pct, Some(50.0));
        assert_eq!(r.server_cpu_us_per_io, Some(0.5));
        assert_eq!(r.client_cpu_pct, 100.0);
        assert_eq!(r.client_preemptions_per_s, 5.0);
        assert!((r.client_runq_wait_pct - 1.0).abs() < 1e-9);
        assert_eq!(r.server_runq_wait_pct, Some(2.0));
        let l = r.lat_us.as_ref().unwrap();
        assert!((l.p50 - 2.0).abs() < 0.01, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        let line = r.summary_line();
        assert!(line.contains("1000000 IOPS"), "{line}");
        assert!(line.contains("0.500 us/IO"), "{line}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["tool"], "blk-bench");
        assert_eq!(json["lat_us"]["p50"].as_f64().map(|v| v > 1.9), Some(true));
    }

    #[test]
    fn an_idle_run_has_no_latency_and_no_cpu_per_io() {
        let h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        let r = Report::new(
            info(),
            &Measured {
                elapsed: Duration::from_secs(10),
                ios: 0,
                latency_ns: &h,
                server_cpu: Some(Duration::from_millis(200)),
                client_cpu: Duration::ZERO,
                client_preemptions: 0,
                client_runq_wait: Duration::ZERO,
                server_runq_wait: None,
            },
        );
        assert!(r.lat_us.is_none());
        assert_eq!(r.server_cpu_us_per_io, None);
        assert_eq!(r.server_cpu_pct, Some(2.0));
    }
}
