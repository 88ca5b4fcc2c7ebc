//! Number formats shared by the views and by the log messages the state writes: durations,
//! ratios, rates, sizes. Plain text, nothing of the terminal.

/// `12.3µs`, `4.56ms`, `1.20s`.
pub(crate) fn micros(us: f64) -> String {
    if !us.is_finite() || us < 0.0 {
        "-".into()
    } else if us < 10.0 {
        format!("{us:.2}µs")
    } else if us < 1000.0 {
        format!("{us:.1}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// `100.0%` for 1.0.
pub(crate) fn percent(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:.1}%", ratio * 100.0)
    } else {
        "-".into()
    }
}

/// A per-second rate: `0`, `3.5`, `1234`, `12.3k`, `4.56M`.
pub(crate) fn per_second(rate: f64) -> String {
    if !rate.is_finite() || rate < 0.0 {
        "-".into()
    } else if rate == 0.0 {
        "0".into()
    } else if rate < 10.0 {
        format!("{rate:.1}")
    } else if rate < 10_000.0 {
        format!("{rate:.0}")
    } else if rate < 10_000_000.0 {
        format!("{:.1}k", rate / 1000.0)
    } else {
        format!("{:.2}M", rate / 1_000_000.0)
    }
}

/// Bytes: `0 B`, `512 KiB`, `23.4 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    let short = size(n);
    match short.strip_suffix(|c: char| c.is_ascii_alphabetic()) {
        Some(number) => format!("{number} {}iB", &short[number.len()..]),
        None => format!("{short} B"),
    }
}

/// Binary size, short: `0`, `512K`, `12.5M`, `1G`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(micros(3.456), "3.46µs");
        assert_eq!(micros(45.67), "45.7µs");
        assert_eq!(micros(1234.0), "1.23ms");
        assert_eq!(micros(2_500_000.0), "2.50s");
        assert_eq!(micros(f64::NAN), "-");
        assert_eq!(percent(1.0), "100.0%");
        assert_eq!(percent(0.123), "12.3%");
        assert_eq!(per_second(0.0), "0");
        assert_eq!(per_second(3.25), "3.2");
        assert_eq!(per_second(1234.4), "1234");
        assert_eq!(per_second(12_345.0), "12.3k");
        assert_eq!(per_second(45_600_000.0), "45.60M");
        assert_eq!(size(0), "0");
        assert_eq!(size(512 << 10), "512K");
        assert_eq!(size(12 << 20 | 512 << 10), "12.5M");
        assert_eq!(size(1 << 30), "1G");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(6000 * 4096), "23.4 MiB");
    }
}
