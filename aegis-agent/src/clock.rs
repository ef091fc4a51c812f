//! Time, for every stage: the kernel's clock, wall time, and RFC 3339 text.
//!
//! A bottom module: it imports nothing of the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Unix time minus monotonic time, in ns: added to a kernel timestamp it gives wall time.
pub fn wall_offset_ns() -> i128 {
    let real = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).expect("CLOCK_REALTIME");
    let real_ns = real.tv_sec() as i128 * 1_000_000_000 + real.tv_nsec() as i128;
    real_ns - monotonic_ns() as i128
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Unix milliseconds as RFC 3339 UTC.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    rfc3339(i128::from(unix_ms) * 1_000_000)
}

/// A system time as RFC 3339 UTC (microseconds).
pub fn rfc3339_at(t: SystemTime) -> String {
    rfc3339(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i128)
}

/// Now, as RFC 3339 UTC (microseconds).
pub fn now_rfc3339() -> String {
    rfc3339_at(SystemTime::now())
}

/// Unix time in ns to "YYYY-MM-DDTHH:MM:SS.ffffffZ" (proleptic Gregorian, UTC).
pub fn rfc3339(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let micros = (unix_ns.rem_euclid(1_000_000_000) / 1000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(rfc3339(1_795_708_800_123_456_789), "2026-11-26T16:00:00.123456Z");
    }
}
