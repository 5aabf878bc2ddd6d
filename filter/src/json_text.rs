//! JSON text written straight into a `String`, for the small objects the filter writes on every
//! request (the access-log summary): building a `serde_json::Value` first costs a tree of
//! allocations and a walk over it, about a tenth of a request's native instructions. Escaping
//! is serde_json's, byte for byte (its tests below say so).

/// `"text"`, escaped as serde_json escapes it: `"`, `\` and control characters; the rest as is.
pub fn push_string(out: &mut String, text: &str) {
    out.push('"');
    let mut from = 0;
    for (at, byte) in text.bytes().enumerate() {
        let escaped = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(text.get(from..at).unwrap_or_default());
        if escaped.is_empty() {
            out.push_str("\\u00");
            out.push(hex_digit(byte >> 4));
            out.push(hex_digit(byte & 0xf));
        } else {
            out.push_str(escaped);
        }
        from = at + 1;
    }
    out.push_str(text.get(from..).unwrap_or_default());
    out.push('"');
}

/// `n` in decimal, as `write!("{n}")` would, without core::fmt (formatting was ~5% of a request's
/// wasm time under V8; `./build.sh bench wasm --perf`).
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    for d in digits.iter().skip(at) {
        out.push(char::from(*d));
    }
}

fn hex_digit(n: u8) -> char {
    char::from(
        b"0123456789abcdef"
            .get(usize::from(n))
            .copied()
            .unwrap_or(b'0'),
    )
}

/// One JSON object, its members written in the order given.
pub struct Object<'a> {
    out: &'a mut String,
    empty: bool,
}

impl<'a> Object<'a> {
    pub fn new(out: &'a mut String) -> Object<'a> {
        out.push('{');
        Object { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        push_string(self.out, key);
        self.out.push(':');
    }

    /// A string member, `null` when absent.
    pub fn string(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        self.key(key);
        match value {
            Some(text) => push_string(self.out, text),
            None => self.out.push_str("null"),
        }
        self
    }

    /// A number member, `null` when absent.
    pub fn number(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        self.key(key);
        match value {
            Some(n) => push_decimal(self.out, n),
            None => self.out.push_str("null"),
        }
        self
    }

    pub fn end(self) {
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn decimals_are_what_format_writes() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            4_294_967_295,
            1_000_000_007,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = String::from("x");
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}"));
        }
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut every_byte: String = (0u8..0x80).map(char::from).collect();
        every_byte.push_str("é 模型 😀 \u{7f} \u{2028}");
        for text in [
            "",
            "plain",
            "a\"b\\c",
            "line\nbreak\ttab\r",
            every_byte.as_str(),
        ] {
            let mut ours = String::new();
            push_string(&mut ours, text);
            assert_eq!(ours, serde_json::to_string(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn an_object_reads_back_as_the_members_written() {
        let mut out = String::new();
        let mut object = Object::new(&mut out);
        object
            .string("a", Some("x\"y"))
            .number("b", Some(u64::MAX))
            .string("c", None)
            .number("d", None);
        object.end();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a": "x\"y", "b": u64::MAX, "c": null, "d": null})
        );
        let mut empty = String::new();
        Object::new(&mut empty).end();
        assert_eq!(empty, "{}");
    }
}
