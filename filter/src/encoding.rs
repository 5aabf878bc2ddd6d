//! Text encodings: Base64 (API-key salts and hashes, as the original writes them), UTC times
//! (`expires-at`) and Envoy's client addresses. Pure functions, shared by the configuration
//! reader, the key table, the request path and the `jairouter-render hash-key` command.

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard Base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let triple = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (triple >> (18 - 6 * i)) & 63;
                let symbol = BASE64_ALPHABET
                    .get(sextet as usize)
                    .copied()
                    .unwrap_or(b'=');
                out.push(char::from(symbol));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard Base64; padding optional (Java's decoder, which the original uses, accepts both).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let data = text.trim_end_matches('=');
    let padding = text.len() - data.len();
    if padding > 2 || (padding > 0 && !text.len().is_multiple_of(4)) || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.as_bytes().chunks(4) {
        let mut acc: u32 = 0;
        for &c in chunk {
            acc = acc << 6 | base64_value(c)?;
        }
        // Left-align a short final group to 24 bits.
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend(bytes.iter().take(chunk.len() - 1));
    }
    Some(out)
}

fn base64_value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// `2027-01-31`, `2027-01-31T00:00:00`, `2027-01-31 00:00:00` (the original's format),
/// optionally with `.fraction` and `Z` or `±HH:MM`, as unix seconds; no zone means UTC and a date
/// alone means the start of that day.
pub fn parse_time(text: &str) -> Option<u64> {
    let mut c = Cursor {
        bytes: text.trim().as_bytes(),
        at: 0,
    };
    let year = c.digits(4)?;
    c.expect(b'-')?;
    let month = c.digits(2)?;
    c.expect(b'-')?;
    let day = c.digits(2)?;
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
        return None;
    }
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut seconds: i64 = 0;
    if let Some(sep) = c.next() {
        if !matches!(sep, b'T' | b't' | b' ') {
            return None;
        }
        let hour = c.digits(2)?;
        c.expect(b':')?;
        let minute = c.digits(2)?;
        let second = if c.eat(b':') { c.digits(2)? } else { 0 };
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        if c.eat(b'.') || c.eat(b',') {
            if !c.peek().is_some_and(|b| b.is_ascii_digit()) {
                return None;
            }
            while c.peek().is_some_and(|b| b.is_ascii_digit()) {
                c.at += 1;
            }
        }
        seconds = hour * 3600 + minute * 60 + second;
        match c.next() {
            None => {}
            Some(b'Z' | b'z') => {}
            Some(sign @ (b'+' | b'-')) => {
                let hours = c.digits(2)?;
                c.eat(b':');
                let minutes = c.digits(2)?;
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let offset = hours * 3600 + minutes * 60;
                // Local = UTC + offset.
                seconds -= if sign == b'+' { offset } else { -offset };
            }
            Some(_) => return None,
        }
    }
    if c.peek().is_some() {
        return None;
    }
    let unix = days_from_civil(year, month, day) * 86_400 + seconds;
    u64::try_from(unix).ok()
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn eat(&mut self, wanted: u8) -> bool {
        let found = self.peek() == Some(wanted);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect(&mut self, wanted: u8) -> Option<()> {
        self.eat(wanted).then_some(())
    }

    /// Exactly `n` decimal digits.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let mut value: i64 = 0;
        for _ in 0..n {
            let b = self.next().filter(u8::is_ascii_digit)?;
            value = value * 10 + i64::from(b - b'0');
        }
        Some(value)
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400; // [0, 399]
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The IP of an Envoy address property ("10.0.0.1:5678", "[::1]:5678"), without the port.
pub fn client_ip(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.split_once(':') {
        // One colon: IPv4 with a port. More: a bare IPv6 address.
        Some((ip, port)) if !port.contains(':') => ip,
        _ => address,
    }
}
