//! Go standard-library behaviour that Consul's HTTP answers leak onto the wire: `time.ParseDuration`
//! and `Duration.String`, `strconv.ParseUint` with its error texts, `strconv.Quote`-style quoting,
//! and `url.Values.Encode`. Clients and tests match these texts, so they are reproduced exactly
//! rather than approximated with Rust's own parsers (which accept `+5`, reject `1.5h`, and so on).

use std::fmt::Write as _;

/// Nanoseconds, signed like Go's `time.Duration`.
pub type GoDuration = i64;

pub const MICROSECOND: i64 = 1_000;
pub const MILLISECOND: i64 = 1_000_000;
pub const SECOND: i64 = 1_000_000_000;
pub const MINUTE: i64 = 60 * SECOND;
pub const HOUR: i64 = 60 * MINUTE;

/// Quotes a string the way Go's `%q` / `strconv.Quote` does for the texts we meet (printable
/// characters kept, quotes and backslashes escaped, control characters as `\x..` or `\n`-style).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, units ns, us, µs, μs, ms, s, m,
/// h; a bare `0` is zero, any other unit-less number is an error. The error texts are Go's.
pub fn parse_duration(orig: &str) -> Result<GoDuration, String> {
    let invalid = || format!("time: invalid duration {}", quote(orig));
    let mut s = orig.as_bytes();
    let mut neg = false;
    if let Some(&c) = s.first()
        && (c == b'-' || c == b'+')
    {
        neg = c == b'-';
        s = &s[1..];
    }
    if s == b"0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    const LIMIT: u64 = 1 << 63;
    let mut d: u64 = 0;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        // Integer part; overflow is an error like Go's leadingInt.
        let mut v: u64 = 0;
        let mut i = 0;
        while i < s.len() && s[i].is_ascii_digit() {
            if v > LIMIT / 10 {
                return Err(invalid());
            }
            v = v * 10 + u64::from(s[i] - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
            i += 1;
        }
        let pre = i > 0;
        s = &s[i..];
        // Fraction part; digits past what fits are dropped, as in Go's leadingFraction.
        let mut f: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if s.first() == Some(&b'.') {
            s = &s[1..];
            let mut i = 0;
            let mut overflow = false;
            while i < s.len() && s[i].is_ascii_digit() {
                if !overflow {
                    if f > (LIMIT - 1) / 10 {
                        overflow = true;
                    } else {
                        let y = f * 10 + u64::from(s[i] - b'0');
                        if y > LIMIT {
                            overflow = true;
                        } else {
                            f = y;
                            scale *= 10.0;
                        }
                    }
                }
                i += 1;
            }
            post = i > 0;
            s = &s[i..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        let mut i = 0;
        while i < s.len() && !(s[i] == b'.' || s[i].is_ascii_digit()) {
            i += 1;
        }
        if i == 0 {
            return Err(format!("time: missing unit in duration {}", quote(orig)));
        }
        let unit_bytes = &s[..i];
        s = &s[i..];
        let unit: u64 = match unit_bytes {
            b"ns" => 1,
            // "us", "µs" (U+00B5) and "μs" (U+03BC)
            b"us" | [0xC2, 0xB5, b's'] | [0xCE, 0xBC, b's'] => 1_000,
            b"ms" => 1_000_000,
            b"s" => 1_000_000_000,
            b"m" => 60_000_000_000,
            b"h" => 3_600_000_000_000,
            _ => {
                let u = String::from_utf8_lossy(unit_bytes);
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    quote(&u),
                    quote(orig)
                ));
            }
        };
        if v > LIMIT / unit {
            return Err(invalid());
        }
        v *= unit;
        if f > 0 {
            v += (f as f64 * (unit as f64 / scale)) as u64;
            if v > LIMIT {
                return Err(invalid());
            }
        }
        d += v;
        if d > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        return Ok((d as i64).wrapping_neg());
    }
    if d > LIMIT - 1 {
        return Err(invalid());
    }
    Ok(d as i64)
}

/// Go's `Duration.String`: `1h2m0.5s`, `1.5ms`, `0s`, `24h0m0s`.
pub fn format_duration(d: GoDuration) -> String {
    let neg = d < 0;
    let mut u = d.unsigned_abs();
    let mut out = String::new();
    if u < SECOND as u64 {
        if u == 0 {
            return "0s".into();
        }
        let (prec, unit) = if u < MICROSECOND as u64 {
            (0, "ns")
        } else if u < MILLISECOND as u64 {
            (3, "µs")
        } else {
            (6, "ms")
        };
        let (frac, rest) = fmt_frac(u, prec);
        out.push_str(&rest.to_string());
        out.push_str(&frac);
        out.push_str(unit);
    } else {
        let (frac, secs) = fmt_frac(u, 9);
        u = secs;
        let s = format!("{}{}s", u % 60, frac);
        u /= 60;
        if u > 0 {
            let m = u % 60;
            u /= 60;
            if u > 0 {
                out.push_str(&format!("{u}h"));
            }
            out.push_str(&format!("{m}m"));
        }
        out.push_str(&s);
    }
    if neg {
        out.insert(0, '-');
    }
    out
}

/// Splits `v` into its integer part and the fraction `.ddd` of `v / 10^prec`, trailing zeros
/// dropped (and the point too when the fraction is zero).
fn fmt_frac(v: u64, prec: u32) -> (String, u64) {
    let pow = 10u64.pow(prec);
    let frac = v % pow;
    if frac == 0 {
        return (String::new(), v / pow);
    }
    let digits = format!("{:0width$}", frac, width = prec as usize);
    (format!(".{}", digits.trim_end_matches('0')), v / pow)
}

/// Go's `strconv.ParseUint(s, 10, 64)`, with its error text (`strconv.ParseUint: parsing "x":
/// invalid syntax`). Unlike Rust's parser it refuses a leading `+`.
pub fn parse_uint(s: &str) -> Result<u64, String> {
    let syntax = || format!("strconv.ParseUint: parsing {}: invalid syntax", quote(s));
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    s.parse::<u64>().map_err(|_| {
        format!(
            "strconv.ParseUint: parsing {}: value out of range",
            quote(s)
        )
    })
}

/// Go's `url.QueryEscape`: unreserved characters kept, space as `+`, the rest `%XX` (upper case).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Go's `url.Values.Encode`: keys sorted, each key's values in their original order.
pub fn encode_query(pairs: &[(String, String)]) -> String {
    let mut keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = String::new();
    for k in keys {
        for (_, v) in pairs.iter().filter(|(pk, _)| pk == k) {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&query_escape(k));
            out.push('=');
            out.push_str(&query_escape(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("-0"), Ok(0));
        assert_eq!(parse_duration("15s"), Ok(15 * SECOND));
        assert_eq!(parse_duration("1500ms"), Ok(1500 * MILLISECOND));
        assert_eq!(parse_duration("1h2m"), Ok(HOUR + 2 * MINUTE));
        assert_eq!(parse_duration("1.5h"), Ok(90 * MINUTE));
        assert_eq!(parse_duration(".5s"), Ok(500 * MILLISECOND));
        assert_eq!(parse_duration("2us"), Ok(2 * MICROSECOND));
        assert_eq!(parse_duration("2µs"), Ok(2 * MICROSECOND));
        assert_eq!(parse_duration("3ns"), Ok(3));
        assert_eq!(parse_duration("-5s"), Ok(-5 * SECOND));
        assert_eq!(parse_duration("+5s"), Ok(5 * SECOND));
        assert_eq!(parse_duration("1h1m1s1ms"), Ok(3_661_001_000_000));
    }

    #[test]
    fn rejects_like_go() {
        assert_eq!(
            parse_duration("10"),
            Err(r#"time: missing unit in duration "10""#.into())
        );
        assert_eq!(
            parse_duration("abc"),
            Err(r#"time: invalid duration "abc""#.into())
        );
        assert_eq!(
            parse_duration(""),
            Err(r#"time: invalid duration """#.into())
        );
        assert_eq!(
            parse_duration("10x"),
            Err(r#"time: unknown unit "x" in duration "10x""#.into())
        );
        assert_eq!(
            parse_duration("."),
            Err(r#"time: invalid duration ".""#.into())
        );
        assert!(parse_duration("9999999999h").is_err());
        assert!(parse_duration("5s ").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(10 * SECOND), "10s");
        assert_eq!(format_duration(24 * HOUR), "24h0m0s");
        assert_eq!(format_duration(HOUR + 500 * MILLISECOND), "1h0m0.5s");
        assert_eq!(format_duration(2 * MINUTE + 3 * SECOND), "2m3s");
        assert_eq!(format_duration(1500 * MICROSECOND), "1.5ms");
        assert_eq!(format_duration(2 * MICROSECOND), "2µs");
        assert_eq!(format_duration(7), "7ns");
        assert_eq!(format_duration(-SECOND), "-1s");
    }

    #[test]
    fn parse_uint_texts() {
        assert_eq!(parse_uint("42"), Ok(42));
        assert_eq!(
            parse_uint("x"),
            Err(r#"strconv.ParseUint: parsing "x": invalid syntax"#.into())
        );
        assert!(parse_uint("+5").is_err());
        assert!(parse_uint("-1").is_err());
        assert_eq!(
            parse_uint("18446744073709551616"),
            Err(r#"strconv.ParseUint: parsing "18446744073709551616": value out of range"#.into())
        );
    }

    #[test]
    fn encodes_query_sorted() {
        let q = vec![
            ("cas".to_string(), "5".to_string()),
            ("acquire".to_string(), "a b/c".to_string()),
        ];
        assert_eq!(encode_query(&q), "acquire=a+b%2Fc&cas=5");
    }
}
