//! `numeric` between its text form, its binary (base-10000 digit groups) form and the
//! canonical decimal pgward encrypts.

use std::fmt::Write as _;

pub(super) const NUMERIC_POS: u16 = 0x0000;
pub(super) const NUMERIC_NEG: u16 = 0x4000;
pub(super) const NUMERIC_NAN: u16 = 0xC000;
pub(super) const NUMERIC_PINF: u16 = 0xD000;
pub(super) const NUMERIC_NINF: u16 = 0xF000;

/// Parse numeric text input (`-1.50`, `.5`, `1e3`, `NaN`, `Infinity`) into the canonical decimal.
pub(super) fn parse_numeric_text(s: &str) -> Result<String, String> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "nan" => return Ok("NaN".into()),
        "infinity" | "+infinity" | "inf" | "+inf" => return Ok("Infinity".into()),
        "-infinity" | "-inf" => return Ok("-Infinity".into()),
        _ => {}
    }
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (
            &body[..i],
            body[i + 1..].parse::<i64>().map_err(|_| "bad exponent")?,
        ),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err("not a number".into());
    }
    if exp.abs() > 100_000 {
        return Err("exponent out of range".into());
    }
    let mut digits = format!("{int}{frac}");
    let mut scale = frac.len() as i64 - exp;
    if scale < 0 {
        digits.extend(std::iter::repeat_n('0', (-scale) as usize));
        scale = 0;
    }
    Ok(assemble_decimal(neg, &digits, scale as usize))
}

/// Build `-?int[.frac]` from a digit string with `scale` fractional digits.
pub(super) fn assemble_decimal(neg: bool, digits: &str, scale: usize) -> String {
    let padded = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits.to_string()
    };
    let (int, frac) = padded.split_at(padded.len() - scale);
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let is_zero = int == "0" && frac.bytes().all(|b| b == b'0');
    let mut out = String::with_capacity(padded.len() + 2);
    if neg && !is_zero {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// The value-equality form of a canonical numeric: trailing fractional zeros removed.
pub(super) fn numeric_equality_form(s: &str) -> String {
    match s.split_once('.') {
        Some((int, frac)) => {
            let frac = frac.trim_end_matches('0');
            let out = if frac.is_empty() {
                int.to_string()
            } else {
                format!("{int}.{frac}")
            };
            if out == "-0" {
                "0".into()
            } else {
                out
            }
        }
        None => s.to_string(),
    }
}

pub(super) fn read_u16(b: &[u8], i: usize) -> Result<u16, String> {
    b.get(i..i + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| "truncated numeric".into())
}

/// Postgres binary numeric -> canonical decimal.
pub(super) fn numeric_from_binary(b: &[u8]) -> Result<String, String> {
    let ndigits = read_u16(b, 0)? as usize;
    let weight = read_u16(b, 2)? as i16 as i64;
    let sign = read_u16(b, 4)?;
    let dscale = read_u16(b, 6)? as usize;
    if b.len() != 8 + 2 * ndigits {
        return Err("numeric length mismatch".into());
    }
    match sign {
        NUMERIC_NAN => return Ok("NaN".into()),
        NUMERIC_PINF => return Ok("Infinity".into()),
        NUMERIC_NINF => return Ok("-Infinity".into()),
        NUMERIC_POS | NUMERIC_NEG => {}
        _ => return Err("bad numeric sign".into()),
    }
    let groups = (0..ndigits)
        .map(|i| read_u16(b, 8 + 2 * i))
        .collect::<Result<Vec<_>, _>>()?;
    if groups.iter().any(|&g| g > 9999) {
        return Err("numeric digit out of range".into());
    }
    // Write every base-10000 group from the highest weight down to the last fractional
    // group dscale needs, as 4 decimal digits each, then cut to the scale.
    let group_at = |w: i64| -> u16 {
        let idx = weight - w;
        if idx >= 0 && (idx as usize) < groups.len() {
            groups[idx as usize]
        } else {
            0
        }
    };
    let mut int_digits = String::new();
    for w in (0..=weight.max(0)).rev() {
        let _ = write!(int_digits, "{:04}", group_at(w));
    }
    let frac_groups = dscale.div_ceil(4) as i64;
    let mut frac_digits = String::new();
    for w in 1..=frac_groups {
        let _ = write!(frac_digits, "{:04}", group_at(-w));
    }
    frac_digits.truncate(dscale);
    Ok(assemble_decimal(
        sign == NUMERIC_NEG,
        &format!("{int_digits}{frac_digits}"),
        dscale,
    ))
}

/// Canonical decimal -> Postgres binary numeric.
pub(super) fn numeric_to_binary(s: &str) -> Result<Vec<u8>, String> {
    let special = match s {
        "NaN" => Some(NUMERIC_NAN),
        "Infinity" => Some(NUMERIC_PINF),
        "-Infinity" => Some(NUMERIC_NINF),
        _ => None,
    };
    if let Some(sign) = special {
        return Ok([0u16, 0, sign, 0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect());
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err("not a canonical numeric".into());
    }
    let dscale = u16::try_from(frac.len()).map_err(|_| "scale too large")?;
    // Align to base-10000 groups around the decimal point.
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let all = format!("{}{int}{frac}{}", "0".repeat(int_pad), "0".repeat(frac_pad));
    let mut groups: Vec<u16> = all
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')))
        .collect();
    let mut weight = ((int.len() + int_pad) / 4) as i64 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let weight = i16::try_from(weight).map_err(|_| "numeric out of range")?;
    let ndigits = u16::try_from(groups.len()).map_err(|_| "numeric out of range")?;
    let sign = if neg && !groups.is_empty() {
        NUMERIC_NEG
    } else {
        NUMERIC_POS
    };
    let mut out = Vec::with_capacity(8 + 2 * groups.len());
    for v in [ndigits, weight as u16, sign, dscale] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Ok(out)
}
