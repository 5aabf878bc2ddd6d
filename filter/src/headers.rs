//! Envoy's serialized header map (`proxy_get_header_map_pairs`), read without trusting it.
//!
//! One host call returns every request header, where asking for each header by name costs a
//! call apiece (~1 µs each under V8, measured by `./build.sh bench`). The layout is a u32 count,
//! then a (name length, value length) u32 pair per header, then each name and value followed by
//! a NUL byte; all little-endian.

/// Headers as Envoy passed them (names in lower case). A header whose name or value is not
/// UTF-8 is left out, as if absent; so is everything after a malformed entry.
///
/// Every name and value lives in one string, each header a pair of spans into it: a request's
/// headers cost two allocations, not two per header (the OpenAI SDKs send a dozen or more).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeaderPairs {
    text: String,
    /// Per header: where its name starts, where its value starts (the name's end), where the
    /// value ends.
    spans: Vec<(usize, usize, usize)>,
    /// `bytes` was exactly a well-formed map, every entry read (none skipped as non-UTF-8):
    /// only then may the map be written back whole.
    complete: bool,
}

impl HeaderPairs {
    /// Reads a serialized map, as far as it is well formed.
    pub fn parse(bytes: &[u8]) -> HeaderPairs {
        decode(bytes)
    }

    /// The map only if `bytes` is exactly one, well formed: every entry in bounds, UTF-8 and
    /// NUL-terminated, nothing after the last. (Envoy hands a JWT claim that is a list in this
    /// layout, and one that is a string as its bytes: a string that merely starts like a map
    /// must stay a string.)
    pub fn parse_exact(bytes: &[u8]) -> Option<HeaderPairs> {
        let pairs = decode(bytes);
        pairs.complete.then_some(pairs)
    }

    fn pair(&self, &(name, value, end): &(usize, usize, usize)) -> (&str, &str) {
        let text = |from: usize, to: usize| self.text.get(from..to).unwrap_or_default();
        (text(name, value), text(value, end))
    }

    /// Every header read, in Envoy's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.spans.iter().map(|span| self.pair(span))
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(name, _)| name)
    }

    /// The first value of a header, by name in any case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// The pairs that could be read, and whether `bytes` was exactly a well-formed map.
fn decode(bytes: &[u8]) -> HeaderPairs {
    let Some(declared) = read_u32(bytes, 0) else {
        return HeaderPairs::default();
    };
    // Each header takes at least 10 bytes (two lengths, two NULs): a count beyond that is a lie.
    let count = declared.min(bytes.len() / 10);
    let mut exact = count == declared;
    let mut data = 4usize.saturating_add(count.saturating_mul(8));
    // The names and values are at most what follows the lengths.
    let mut text = String::with_capacity(bytes.len().saturating_sub(data));
    let mut spans = Vec::with_capacity(count);
    for n in 0..count {
        let at = 4 + n * 8;
        let (Some(name_len), Some(value_len)) = (read_u32(bytes, at), read_u32(bytes, at + 4))
        else {
            exact = false;
            break;
        };
        let Some((name, after, name_ended)) = take(bytes, data, name_len) else {
            exact = false;
            break;
        };
        let Some((value, after, value_ended)) = take(bytes, after, value_len) else {
            exact = false;
            break;
        };
        exact &= name_ended && value_ended;
        data = after;
        if let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) {
            let start = text.len();
            text.push_str(name);
            let middle = text.len();
            text.push_str(value);
            spans.push((start, middle, text.len()));
        } else {
            exact = false;
        }
    }
    let complete = exact && data == bytes.len();
    HeaderPairs {
        text,
        spans,
        complete,
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    usize::try_from(crate::bytes::u32_le(bytes, at)?).ok()
}

/// `len` bytes at `at`, where the next field starts (past the NUL), and whether the NUL is there.
fn take(bytes: &[u8], at: usize, len: usize) -> Option<(&[u8], usize, bool)> {
    let end = at.checked_add(len)?;
    let field = bytes.get(at..end)?;
    Some((field, end.checked_add(1)?, bytes.get(end) == Some(&0)))
}

/// The layout `parse` reads, from name-value pairs (for tests and fuzzing; Envoy writes it).
pub fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let length = |bytes: &[u8]| u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = u32::try_from(pairs.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes()
        .to_vec();
    for (name, value) in pairs {
        out.extend(length(name));
        out.extend(length(value));
    }
    for (name, value) in pairs {
        out.extend(*name);
        out.push(0);
        out.extend(*value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_is_complete_only_when_no_entry_was_skipped() {
        let good = HeaderPairs::parse(&encode(&[(b"a", b"1"), (b"b", b"2")]));
        assert!(good.is_complete());
        assert_eq!(good.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
        let skipped = HeaderPairs::parse(&encode(&[(b"a", b"1"), (b"b", b"\xff")]));
        assert!(!skipped.is_complete());
        assert_eq!(skipped.get("a"), Some("1"));
        assert!(!HeaderPairs::parse(&[]).is_complete());
    }

    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        encode(pairs)
    }

    #[test]
    fn reads_every_header() {
        let bytes = serialize(&[
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b"content-type", b"application/json"),
            (b"x-empty", b""),
        ]);
        let headers = HeaderPairs::parse(&bytes);
        assert_eq!(headers.get(":method"), Some("POST"));
        assert_eq!(headers.get(":path"), Some("/v1/chat/completions"));
        assert_eq!(headers.get("Content-Type"), Some("application/json"));
        assert_eq!(headers.get("x-empty"), Some(""));
        assert!(headers.contains("x-empty"));
        assert_eq!(headers.get("x-missing"), None);
    }

    #[test]
    fn a_non_utf8_value_reads_as_absent_and_the_rest_survive() {
        let bytes = serialize(&[(b"x-bad", b"\xff\xfe"), (b"x-good", b"yes")]);
        let headers = HeaderPairs::parse(&bytes);
        assert_eq!(headers.get("x-bad"), None);
        assert_eq!(headers.get("x-good"), Some("yes"));
    }

    #[test]
    fn an_exact_map_is_all_of_the_bytes() {
        let bytes = serialize(&[(b"chat", b""), (b"embedding", b"")]);
        let list = HeaderPairs::parse_exact(&bytes).unwrap();
        assert_eq!(list.names().collect::<Vec<_>>(), ["chat", "embedding"]);
        assert_eq!(HeaderPairs::parse_exact(&bytes[..bytes.len() - 1]), None);
        assert_eq!(HeaderPairs::parse_exact(&[&bytes[..], b"x"].concat()), None);
        let mut unterminated = bytes.clone();
        let last = unterminated.len() - 1;
        unterminated[last] = b'x';
        assert_eq!(HeaderPairs::parse_exact(&unterminated), None);
        assert_eq!(HeaderPairs::parse_exact(b"chat embedding"), None);
    }

    #[test]
    fn a_truncated_or_lying_map_never_reads_out_of_bounds() {
        let bytes = serialize(&[(b"a", b"1"), (b"b", b"2")]);
        for cut in 0..bytes.len() {
            let headers = HeaderPairs::parse(bytes.get(..cut).unwrap_or_default());
            assert!(headers.spans.len() <= 2);
        }
        let mut lying = bytes.clone();
        lying.splice(0..4, u32::MAX.to_le_bytes());
        assert!(HeaderPairs::parse(&lying).spans.len() <= 2);
        let mut long = bytes;
        long.splice(4..8, u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs::parse(&long), HeaderPairs::default());
        assert_eq!(HeaderPairs::parse(&[]), HeaderPairs::default());
    }
}
