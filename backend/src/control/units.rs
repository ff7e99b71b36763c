//! Operator-facing values: sizes with binary suffixes, durations, rates, CPU lists, timestamps.

use std::time::Duration;

use super::Error;

const UNITS: [(char, u32); 5] = [('K', 10), ('M', 20), ('G', 30), ('T', 40), ('P', 50)];

/// Parses `4096`, `512K`, `10G`, `1T`, `1.5G` or `10GiB` (binary units, case-insensitive).
/// A fraction is accepted only when it names a whole number of bytes: `1.5K` is 1536, `1.3K`
/// is refused rather than rounded.
pub fn parse_size(input: &str) -> Result<u64, Error> {
    let bad = |reason: &str| Error::InvalidSize { input: input.to_owned(), reason: reason.to_owned() };
    let s = input.trim();
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(bad("expected a number of bytes, optionally with a K/M/G/T/P suffix"));
    }
    let shift = match suffix {
        "" | "B" | "b" => 0,
        _ => {
            let mut chars = suffix.chars();
            let unit = chars.next().map(|c| c.to_ascii_uppercase());
            let rest = chars.as_str();
            let shift = UNITS.iter().find(|(u, _)| Some(*u) == unit).map(|(_, s)| *s);
            match (shift, rest) {
                (Some(shift), "" | "iB" | "ib" | "IB") => shift,
                (Some(_), "B" | "b") => {
                    return Err(bad("decimal units (KB, MB, GB) are ambiguous; use K/M/G (binary) or KiB/MiB/GiB"))
                }
                _ => return Err(bad("unknown unit (use K, M, G, T or P: binary)")),
            }
        }
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(bad("malformed number"));
    }
    // Bounded so the u128 arithmetic below cannot overflow: 20 digits exceed any u64.
    if whole.len() > 20 || fraction.len() > 20 {
        return Err(bad("too large"));
    }
    let whole: u128 = whole.parse().map_err(|_| bad("malformed number"))?;
    let mut bytes = whole << shift;
    if !fraction.is_empty() {
        let numerator: u128 = fraction.parse().map_err(|_| bad("malformed number"))?;
        let denominator = 10u128.pow(u32::try_from(fraction.len()).map_err(|_| bad("too long"))?);
        let scaled = numerator << shift;
        if !scaled.is_multiple_of(denominator) {
            return Err(bad("not a whole number of bytes"));
        }
        bytes += scaled / denominator;
    }
    u64::try_from(bytes).map_err(|_| bad("too large"))
}

/// The exact size in the largest unit that divides it (`10G`, `1536M`, `1000`), so that
/// [`parse_size`] reads it back to the same number.
pub fn format_size_exact(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    for (unit, shift) in UNITS.iter().rev() {
        if bytes.trailing_zeros() >= *shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// An approximate size for people: `9.31 GiB`.
pub fn format_size_human(bytes: u64) -> String {
    const NAMES: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut index = 0;
    while value >= 1024.0 && index + 1 < NAMES.len() {
        value /= 1024.0;
        index += 1;
    }
    if index == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", NAMES[index])
    }
}

/// A size for tables, short and approximate: `512`, `1.5K`, `10G`, `931.3G` (binary units;
/// one decimal unless the value is whole).
pub fn format_size_short(bytes: u64) -> String {
    let mut index = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && index + 1 < UNITS.len() + 1 {
        value /= 1024.0;
        index += 1;
    }
    if index == 0 {
        return bytes.to_string();
    }
    let unit = UNITS[index - 1].0;
    if value.fract() == 0.0 {
        format!("{value:.0}{unit}")
    } else {
        format!("{value:.1}{unit}")
    }
}

/// Parses `500ms`, `5s`, `10m`, `2h` or `1d`: a whole number and one unit. A bare number is
/// refused (seconds or milliseconds? the operator says which).
pub fn parse_duration(input: &str) -> Result<Duration, Error> {
    let bad = |reason: &str| Error::Invalid(format!("invalid duration {input:?}: {reason}"));
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(bad("expected a whole number and a unit: ms, s, m, h or d (e.g. 5s, 10m)"));
    }
    if number.len() > 12 {
        return Err(bad("too large"));
    }
    let n: u64 = number.parse().map_err(|_| bad("malformed number"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(bad("no unit (ms, s, m, h or d)")),
        _ => return Err(bad("unknown unit (ms, s, m, h or d)")),
    };
    let ms = n.checked_mul(unit_ms).ok_or_else(|| bad("too large"))?;
    Ok(Duration::from_millis(ms))
}

/// A duration for people, exact to the second: `45s`, `14m05s`, `3h02m`, `2d04h`.
pub fn format_duration_s(seconds: u64) -> String {
    let (d, h, m, s) = (seconds / 86_400, (seconds / 3600) % 24, (seconds / 60) % 60, seconds % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Parses a rate in bytes per second: a size ([`parse_size`]), optionally followed by `/s`.
pub fn parse_rate(input: &str) -> Result<u64, Error> {
    let trimmed = input.trim();
    parse_size(trimmed.strip_suffix("/s").unwrap_or(trimmed))
}

/// Parses a Linux CPU list as in /sys/devices/system/cpu/online: `0`, `0-3`, `0,2-3`.
/// Returns the sorted, deduplicated CPU numbers.
pub fn parse_cpu_list(input: &str) -> Result<Vec<usize>, Error> {
    // A bound on the list: more CPUs than any machine we run on means a typo like `0-999999`.
    const MAX_CPU: usize = 4096;
    let bad = |reason: &str| Error::Invalid(format!("invalid CPU list {input:?}: {reason}"));
    let mut cpus = Vec::new();
    for part in input.trim().split(',') {
        let part = part.trim();
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let first: usize = first.trim().parse().map_err(|_| bad("expected numbers like 0,2-3"))?;
        let last: usize = last.trim().parse().map_err(|_| bad("expected numbers like 0,2-3"))?;
        if first > last {
            return Err(bad("range goes backwards"));
        }
        if last >= MAX_CPU {
            return Err(bad("CPU number too large"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// `2026-11-22T03:25:10Z` for a Unix time, without pulling in a date crate.
pub fn format_rfc3339(unix_s: u64) -> String {
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, (secs / 60) % 60, secs % 60)
}

/// `2026-11-22T03:25:10.000000042Z` for a time since the Unix epoch: sortable, and distinct
/// for two events in the same second (audit keys).
pub fn format_rfc3339_nanos(since_epoch: Duration) -> String {
    let seconds = format_rfc3339(since_epoch.as_secs());
    format!("{}.{:09}Z", &seconds[..seconds.len() - 1], since_epoch.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
        assert_eq!(parse_size(" 64M ").unwrap(), 64 << 20);
    }

    #[test]
    fn bad_sizes_are_refused_not_rounded() {
        for bad in ["", "G", "1.3K", "1.", ".5G", "1..5G", "10X", "10GB", "-1", "1 G", "99999999999999999999P", "1e9"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        // One past u64::MAX.
        assert!(parse_size("18446744073709551616").is_err());
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        assert!(parse_size("16384P").is_err());
    }

    #[test]
    fn exact_format_round_trips() {
        for bytes in [0, 1, 512, 1000, 4096, 3 << 29, 10 << 30, 1 << 40, u64::MAX, 1 << 63] {
            let text = format_size_exact(bytes);
            assert_eq!(parse_size(&text).unwrap(), bytes, "{text}");
        }
        assert_eq!(format_size_exact(10 << 30), "10G");
        assert_eq!(format_size_exact(3 << 29), "1536M");
    }

    #[test]
    fn human_format() {
        assert_eq!(format_size_human(512), "512 B");
        assert_eq!(format_size_human(10 << 30), "10.00 GiB");
        assert_eq!(format_size_human(1_000_000_000), "953.67 MiB");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("3,0-1,1").unwrap(), vec![0, 1, 3]);
        for bad in ["", "a", "1-0", "0-", "0,,1", "0-99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration(" 2h ").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        for bad in ["", "5", "s", "5 s", "1.5s", "-1s", "5sec", "5S", "9999999999999d", "5m3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(format_duration_s(45), "45s");
        assert_eq!(format_duration_s(845), "14m05s");
        assert_eq!(format_duration_s(3 * 3600 + 125), "3h02m");
        assert_eq!(format_duration_s(2 * 86_400 + 4 * 3600 + 59), "2d04h");
    }

    #[test]
    fn rates_and_short_sizes() {
        assert_eq!(parse_rate("64M").unwrap(), 64 << 20);
        assert_eq!(parse_rate("64M/s").unwrap(), 64 << 20);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("64MB/s").is_err());
        assert_eq!(format_size_short(512), "512");
        assert_eq!(format_size_short(1536), "1.5K");
        assert_eq!(format_size_short(10 << 30), "10G");
        assert_eq!(format_size_short(1_000_000_000_000), "931.3G");
        assert_eq!(format_size_short(u64::MAX), "16384P");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_317_910), "2026-11-22T03:25:10Z");
        assert_eq!(format_rfc3339_nanos(Duration::new(1_795_317_910, 42)), "2026-11-22T03:25:10.000000042Z");
    }
}
