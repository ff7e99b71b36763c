//! Command line of `blk-bench` and its validated form.

use std::path::PathBuf;
use std::time::Duration;

/// Upper bound on the queue depth: libblkio's default virtqueue size is 256 and a deeper
/// queue than that only measures the backlog inside libblkio.
pub const QD_MAX: u32 = 256;
/// Largest request we issue; vhost-user servers commonly cap a request at 1 MiB or less.
pub const BS_MAX_BYTES: u64 = 1 << 20;
/// A run longer than an hour is a mistake, not a benchmark.
const SECONDS_MAX: f64 = 3600.0;

#[derive(clap::Parser, Debug)]
#[command(
    name = "blk-bench",
    about = "vhost-user-blk benchmark client (libblkio virtio-blk-vhost-user, busy-polled queue)"
)]
pub struct Args {
    /// vhost-user-blk Unix socket of the server under test.
    #[arg(long)]
    pub socket: PathBuf,
    /// Access pattern: randread, randwrite, seqread, idle (randread during the warmup,
    /// then no I/O for --seconds while the server's CPU use is sampled), or fill (writes the
    /// span once, sequentially, then stops: prepares a volume so reads hit its disks).
    #[arg(long)]
    pub workload: String,
    /// Request size, bytes with optional k/m suffix (binary), e.g. 4k, 128k.
    #[arg(long)]
    pub bs: String,
    /// Requests kept in flight.
    #[arg(long)]
    pub qd: u32,
    /// Measured duration in seconds (after the warmup).
    #[arg(long, default_value = "5")]
    pub seconds: f64,
    /// Warmup duration in seconds; I/O runs but is not counted.
    #[arg(long, default_value = "1")]
    pub warmup: f64,
    /// PID of the server process; its CPU time (all threads) is sampled around the
    /// measured interval. Omit to skip server CPU accounting.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Core the client thread is pinned to. Omit to leave it unpinned.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Limit the accessed region to the first N bytes (k/m/g suffix) of the disk. Default:
    /// the whole capacity the device reports.
    #[arg(long)]
    pub span: Option<String>,
    /// Free-form name of the configuration under test, copied into the report (e.g. qsd-null).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    RandRead,
    RandWrite,
    SeqRead,
    Idle,
    Fill,
}

impl Workload {
    pub fn is_write(self) -> bool {
        matches!(self, Workload::RandWrite | Workload::Fill)
    }

    pub fn is_random(self) -> bool {
        !matches!(self, Workload::SeqRead | Workload::Fill)
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::SeqRead => "seqread",
            Workload::Idle => "idle",
            Workload::Fill => "fill",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "randread" => Ok(Workload::RandRead),
            "randwrite" => Ok(Workload::RandWrite),
            "seqread" => Ok(Workload::SeqRead),
            "idle" => Ok(Workload::Idle),
            "fill" => Ok(Workload::Fill),
            other => Err(ConfigError::Workload(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("unknown workload {0:?} (expected randread, randwrite, seqread or idle)")]
    Workload(String),
    #[error("invalid size {0:?} (expected bytes with optional k/m/g suffix)")]
    Size(String),
    #[error("--bs must be a non-zero multiple of 512 up to {BS_MAX_BYTES}, got {0}")]
    BlockSize(u64),
    #[error("--qd must be in 1..={QD_MAX}, got {0}")]
    QueueDepth(u32),
    #[error("--{name} must be a finite number of seconds in {min}..={SECONDS_MAX}, got {value}")]
    Seconds { name: &'static str, min: f64, value: f64 },
    #[error("--span must be a non-zero multiple of --bs ({bs}), got {span}")]
    Span { span: u64, bs: u64 },
    #[error("core {0} is not available to this process")]
    Cpu(usize),
}

/// A validated run description. Defaults are those of [`Args`].
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub workload: Workload,
    pub bs_bytes: u64,
    pub qd: u32,
    pub measure: Duration,
    pub warmup: Duration,
    pub server_pid: Option<u32>,
    pub cpu: Option<usize>,
    /// `None`: the device capacity.
    pub span_bytes: Option<u64>,
    pub label: String,
    pub json: Option<PathBuf>,
}

/// Parses `4096`, `4k`, `128K`, `1m`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        Some(_) => (t, 0),
        None => return Err(err()),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

fn seconds(name: &'static str, min: f64, value: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && value >= min && value <= SECONDS_MAX {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::Seconds { name, min, value })
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, Self::Error> {
        let workload: Workload = a.workload.parse()?;
        let bs_bytes = parse_size(&a.bs)?;
        if bs_bytes == 0 || bs_bytes % 512 != 0 || bs_bytes > BS_MAX_BYTES {
            return Err(ConfigError::BlockSize(bs_bytes));
        }
        if a.qd == 0 || a.qd > QD_MAX {
            return Err(ConfigError::QueueDepth(a.qd));
        }
        // A measured interval shorter than 100 ms is dominated by timer and /proc granularity.
        let measure = seconds("seconds", 0.1, a.seconds)?;
        let warmup = seconds("warmup", 0.0, a.warmup)?;
        let span_bytes = match a.span {
            None => None,
            Some(s) => {
                let span = parse_size(&s)?;
                if span == 0 || span % bs_bytes != 0 {
                    return Err(ConfigError::Span { span, bs: bs_bytes });
                }
                Some(span)
            }
        };
        if let Some(cpu) = a.cpu {
            let available = core_affinity::get_core_ids().unwrap_or_default();
            if !available.iter().any(|c| c.id == cpu) {
                return Err(ConfigError::Cpu(cpu));
            }
        }
        Ok(Config {
            socket: a.socket,
            workload,
            bs_bytes,
            qd: a.qd,
            measure,
            warmup,
            server_pid: a.server_pid,
            cpu: a.cpu,
            span_bytes,
            label: a.label,
            json: a.json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(workload: &str, bs: &str, qd: u32) -> Args {
        Args {
            socket: "/tmp/x.sock".into(),
            workload: workload.into(),
            bs: bs.into(),
            qd,
            seconds: 5.0,
            warmup: 1.0,
            server_pid: None,
            cpu: None,
            span: None,
            label: String::new(),
            json: None,
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(131072));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("99999999999999999999t").is_err());
        assert!(parse_size("17179869184t").is_err(), "overflow must be rejected");
    }

    #[test]
    fn valid_arguments_become_a_config() {
        let c = Config::try_from(args("randwrite", "4k", 32)).unwrap();
        assert_eq!(c.workload, Workload::RandWrite);
        assert!(c.workload.is_write());
        assert_eq!(c.bs_bytes, 4096);
        assert_eq!(c.measure, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_are_rejected_not_fixed() {
        assert_eq!(Config::try_from(args("randrw", "4k", 1)).unwrap_err(), ConfigError::Workload("randrw".into()));
        assert_eq!(Config::try_from(args("randread", "1000", 1)).unwrap_err(), ConfigError::BlockSize(1000));
        assert_eq!(Config::try_from(args("randread", "4m", 1)).unwrap_err(), ConfigError::BlockSize(4 << 20));
        assert_eq!(Config::try_from(args("randread", "4k", 0)).unwrap_err(), ConfigError::QueueDepth(0));
        assert_eq!(
            Config::try_from(args("randread", "4k", QD_MAX + 1)).unwrap_err(),
            ConfigError::QueueDepth(QD_MAX + 1)
        );
        let mut a = args("randread", "4k", 1);
        a.seconds = f64::NAN;
        assert!(matches!(Config::try_from(a).unwrap_err(), ConfigError::Seconds { name: "seconds", .. }));
        let mut a = args("randread", "4k", 1);
        a.span = Some("6k".into());
        assert_eq!(Config::try_from(a).unwrap_err(), ConfigError::Span { span: 6144, bs: 4096 });
        let mut a = args("randread", "4k", 1);
        a.cpu = Some(usize::MAX);
        assert_eq!(Config::try_from(a).unwrap_err(), ConfigError::Cpu(usize::MAX));
    }
}
