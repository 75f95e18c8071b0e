//! Times for `engine logs` and `engine events`: RFC 3339 in UTC for the
//! output, and `--since` as a duration back from now or an RFC 3339 time.
//! Civil-date arithmetic after Howard Hinnant's `days_from_civil`, so the
//! CLI needs no date crate.

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-12-03T22:25:02.123Z`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX / 2);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
}

fn num(s: &str, what: &str) -> Result<i64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what}: {s:?} is not a number"));
    }
    s.parse()
        .map_err(|_| format!("{what}: {s:?} is out of range"))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (a space for the `T` too)
/// into unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?}: give a duration (30s, 10m, 2h, 1d) or an RFC 3339 time (2026-12-03T22:00:00Z)"
        )
    };
    // Byte positions below slice the text: ASCII only, or a multi-byte
    // character across a boundary would panic (review).
    if !s.is_ascii() {
        return Err(bad());
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (y, mo, d) = (
        num(&s[0..4], "year")?,
        num(&s[5..7], "month")?,
        num(&s[8..10], "day")?,
    );
    let (h, mi, sec) = (
        num(&s[11..13], "hour")?,
        num(&s[14..16], "minute")?,
        num(&s[17..19], "second")?,
    );
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(bad());
        }
        let digits = &frac[..n];
        let padded = format!("{:0<3}", &digits[..n.min(3)]);
        ms = num(&padded, "fraction")?;
        rest = &frac[n..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let v = num(&rest[1..3], "offset hours")? * 60 + num(&rest[4..6], "offset minutes")?;
            if &rest[..1] == "-" {
                -v
            } else {
                v
            }
        }
        _ => return Err(bad()),
    };
    let days_in = |y: i64, m: i64| match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    };
    if !(1..=12).contains(&mo) || d < 1 || d > days_in(y, mo) || h > 23 || mi > 59 || sec > 60 {
        return Err(format!("{s:?}: no such date or time"));
    }
    let secs =
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    if secs < 0 {
        return Err(format!("{s:?}: before 1970"));
    }
    Ok(u64::try_from(secs * 1000 + ms).unwrap_or(0))
}

/// `--since`: a duration back from `now_ms` (`90s`, `10m`, `2h`, `1d`) or
/// an RFC 3339 time.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    let mult: u64 = match s.as_bytes().last() {
        Some(b's') => 1000,
        Some(b'm') => 60_000,
        Some(b'h') => 3_600_000,
        Some(b'd') => 86_400_000,
        _ => return parse_rfc3339(s),
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return parse_rfc3339(s);
    }
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: out of range"))?;
    let back = n
        .checked_mul(mult)
        .filter(|b| *b <= now_ms)
        .ok_or_else(|| format!("{s:?}: reaches before 1970"))?;
    Ok(now_ms - back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        let t = 1_796_336_702_123; // 2026-12-03T22:25:02.123Z
        assert_eq!(rfc3339_ms(t), "2026-12-03T22:25:02.123Z");
        assert_eq!(parse_rfc3339("2026-12-03T22:25:02.123Z"), Ok(t));
        assert_eq!(parse_rfc3339("2026-12-03 22:25:02.123456Z"), Ok(t));
        assert_eq!(parse_rfc3339("2026-12-03T23:25:02.123+01:00"), Ok(t));
        assert_eq!(parse_rfc3339("2026-12-03T20:25:02.123-02:00"), Ok(t));
        assert_eq!(parse_rfc3339("2026-12-03T22:25:02Z"), Ok(t - 123));
        for day in [0u64, 59, 60, 365, 10_957, 20_000, 40_000] {
            let ms = day * 86_400_000 + 45_296_007;
            assert_eq!(parse_rfc3339(&rfc3339_ms(ms)), Ok(ms));
        }
    }

    #[test]
    fn bad_times_are_refused_with_the_text() {
        for s in [
            "yesterday",
            "2026-12-03",
            "2026-12-03T22:25:02",
            "2026-13-03T22:25:02Z",
            "2026-02-30T22:25:02Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T22:25:02.Z",
            "2026-12-03T22:25:02+0100",
            "1969-12-31T23:59:59Z",
            "10x",
            "2026-12-03T22:25:0\u{20ac}Z",
            "2026-12-03T22:25:02+0\u{e9}:00",
            "2026-12-03T22:25:02\u{e9}",
            "2026-12-03T22:25:02.5\u{e9}",
        ] {
            let e = parse_since(s, 1_000_000).unwrap_err();
            assert!(e.contains(s), "{s}: {e}");
        }
    }

    proptest::proptest! {
        /// Whatever the text, an answer and never a panic.
        #[test]
        fn any_since_is_answered(s in "\\PC{0,40}") {
            let _ = parse_since(&s, 1_796_336_702_123);
        }
    }

    #[test]
    fn durations_count_back_from_now() {
        let now = 1_796_336_702_123;
        assert_eq!(parse_since("90s", now), Ok(now - 90_000));
        assert_eq!(parse_since("10m", now), Ok(now - 600_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_since("0s", now), Ok(now));
        assert!(parse_since("99999999999d", now).is_err());
    }
}
