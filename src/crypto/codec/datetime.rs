//! Dates and times in PostgreSQL's text forms (`DateStyle=ISO`, UTC) and the day and
//! microsecond counts from 2000-01-01 its binary forms use.

use std::fmt::Write as _;

/// Days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub(super) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
pub(super) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub(super) const PG_EPOCH_DAYS: i64 = 10_957; // 2000-01-01 in days since 1970-01-01
pub(super) const USECS_PER_DAY: i64 = 86_400_000_000;

pub(super) fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// `YYYY-MM-DD` -> days since the Postgres epoch.
pub(super) fn parse_ymd(s: &str) -> Result<i64, String> {
    let mut parts = s.splitn(3, '-');
    let (y, m, d) = match (parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d)) => (y, m, d),
        _ => return Err("expected YYYY-MM-DD".into()),
    };
    let y: i64 = y.parse().map_err(|_| "bad year")?;
    let m: u32 = m.parse().map_err(|_| "bad month")?;
    let d: u32 = d.parse().map_err(|_| "bad day")?;
    if !(1..=294_276).contains(&y) || !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return Err("date out of range".into());
    }
    Ok(days_from_civil(y, m, d) - PG_EPOCH_DAYS)
}

pub(super) fn parse_date(s: &str) -> Result<i32, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let days = parse_ymd(s.trim())?;
    i32::try_from(days).map_err(|_| "date out of range".to_string())
}

pub(super) fn format_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        _ => {
            let (y, m, d) = civil_from_days(i64::from(days) + PG_EPOCH_DAYS);
            format!("{y:04}-{m:02}-{d:02}")
        }
    }
}

/// Parse `HH:MM[:SS[.ffffff]]` into microseconds (rounded to the microsecond, as Postgres does).
pub(super) fn parse_time(s: &str) -> Result<i64, String> {
    let mut parts = s.splitn(3, ':');
    let h: i64 = parts.next().unwrap_or("").parse().map_err(|_| "bad hour")?;
    let mi: i64 = parts
        .next()
        .ok_or("missing minutes")?
        .parse()
        .map_err(|_| "bad minute")?;
    let (sec, frac) = match parts.next() {
        None => (0, 0),
        Some(sec) => {
            let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
            let whole: i64 = whole.parse().map_err(|_| "bad second")?;
            if !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err("bad fraction".into());
            }
            let mut digits: Vec<i64> = frac.bytes().map(|b| i64::from(b - b'0')).collect();
            let round_up = digits.get(6).is_some_and(|&d| d >= 5);
            digits.resize(6, 0);
            let micros = digits.iter().fold(0, |acc, d| acc * 10 + d) + i64::from(round_up);
            (whole, micros)
        }
    };
    if !(0..=24).contains(&h) || !(0..60).contains(&mi) || !(0..=60).contains(&sec) {
        return Err("time out of range".into());
    }
    Ok(((h * 60 + mi) * 60 + sec) * 1_000_000 + frac)
}

/// Parse a UTC offset `Z`, `+HH`, `+HHMM`, `+HH:MM`, `+HH:MM:SS` into seconds east of UTC.
pub(super) fn parse_offset(s: &str) -> Result<i64, String> {
    if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
        return Ok(0);
    }
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err("bad UTC offset".into()),
    };
    let fields: Vec<&str> = if rest.contains(':') {
        rest.split(':').collect()
    } else if rest.len() == 4 {
        vec![&rest[..2], &rest[2..]]
    } else {
        vec![rest]
    };
    let mut secs = 0i64;
    for (i, f) in fields.iter().enumerate().take(3) {
        let v: i64 = f.parse().map_err(|_| "bad UTC offset")?;
        secs += v * [3600, 60, 1][i];
    }
    Ok(sign * secs)
}

pub(super) fn parse_timestamptz(s: &str) -> Result<i64, String> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let (date, rest) = t.split_at(t.find([' ', 'T', 't']).unwrap_or(t.len()));
    let days = parse_ymd(date)?;
    let rest = rest.get(1..).unwrap_or("").trim();
    // The offset starts at the first '+', '-', 'Z' or space after the time.
    let split = rest.find(['+', '-', 'Z', 'z', ' ']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(split);
    let micros = if time.is_empty() {
        0
    } else {
        parse_time(time)?
    };
    let offset = offset.trim();
    let offset_secs = if offset.is_empty() {
        0
    } else {
        parse_offset(offset)?
    };
    days.checked_mul(USECS_PER_DAY)
        .and_then(|d| d.checked_add(micros))
        .and_then(|t| t.checked_sub(offset_secs * 1_000_000))
        .ok_or_else(|| "timestamp out of range".to_string())
}

pub(super) fn format_timestamptz(t: i64) -> String {
    match t {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        _ => {
            let days = t.div_euclid(USECS_PER_DAY);
            let micros = t.rem_euclid(USECS_PER_DAY);
            let mut out = format_date(days as i32);
            let secs = micros / 1_000_000;
            let frac = micros % 1_000_000;
            let _ = write!(
                out,
                " {:02}:{:02}:{:02}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            );
            if frac != 0 {
                let f = format!("{frac:06}");
                out.push('.');
                out.push_str(f.trim_end_matches('0'));
            }
            out.push_str("+00");
            out
        }
    }
}
