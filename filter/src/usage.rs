//! Reads the token usage of a response as it streams past: the `usage` object of an OpenAI JSON
//! answer or of the final SSE chunk of a stream. When a response reports none, the completion
//! is estimated from the text it carried, as the original does (CJK characters / 2, others / 4).
//!
//! The reader is a lenient tokenizer over bytes, not a JSON parser: it follows strings, keys and
//! numbers, so SSE framing (`data: `, `[DONE]`) between JSON documents does not disturb it, and it
//! keeps a few dozen bytes of state however long the response is.

/// Keys whose string values are completion text.
const TEXT_KEYS: [&[u8]; 4] = [b"content", b"text", b"reasoning_content", b"arguments"];
/// Keys are compared only when short: no interesting key is longer.
const MAX_KEY: usize = 24;
/// A count above this is not believed (treated as not reported, so the estimate is charged):
/// no model answers 10 million tokens at once, and a broken or hostile backend's
/// `"prompt_tokens": 99999999999999999999` would otherwise sink a token budget into debt that
/// takes its refill hours to pay back.
pub const MAX_REPORTED_TOKENS: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Other,
    PromptTokens,
    CompletionTokens,
    Text,
}

fn classify(key: &[u8]) -> Key {
    match key {
        b"prompt_tokens" | b"input_tokens" => Key::PromptTokens,
        b"completion_tokens" | b"output_tokens" => Key::CompletionTokens,
        _ if TEXT_KEYS.contains(&key) => Key::Text,
        _ => Key::Other,
    }
}

/// What a response used, as far as it tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// The completion estimated from its text.
    pub estimated_completion: u64,
}

impl Usage {
    /// The tokens to charge: the reported counts, the estimates where a count is missing.
    pub fn charge(&self, prompt_estimate: u64) -> u64 {
        self.prompt_tokens
            .unwrap_or(prompt_estimate)
            .saturating_add(self.completion_tokens.unwrap_or(self.estimated_completion))
    }
}

#[derive(Debug, Default)]
pub struct UsageScanner {
    in_string: bool,
    escape: bool,
    /// Hex digits of a `\u` escape still to read, and their value.
    unicode_left: u8,
    unicode_value: u32,
    /// The current string's first bytes, while it may still be a key we know (`string_len` of
    /// them; one more than `MAX_KEY` marks a string too long to be one).
    string: [u8; MAX_KEY + 1],
    string_len: usize,
    /// Whether the current string is a text value (counted, not kept).
    counting: bool,
    /// A string just ended; if a `:` follows it was this key.
    pending_key: Option<Key>,
    /// The key whose value comes next.
    value_key: Option<Key>,
    number: Option<u64>,
    /// UTF-8 bytes still expected for the current character, and its code point so far.
    utf8_left: u8,
    code_point: u32,
    cjk_chars: u64,
    other_chars: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl UsageScanner {
    pub fn new() -> UsageScanner {
        UsageScanner::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            // Most of an answer is the inside of strings: a run of plain bytes there is taken
            // at once (counted as text, or kept as a key's first bytes), not byte by byte.
            if self.in_string && !self.escape && self.unicode_left == 0 && self.utf8_left == 0 {
                let run = self.plain_run(rest);
                if run > 0 {
                    rest = rest.get(run..).unwrap_or_default();
                    continue;
                }
            }
            if self.in_string {
                self.string_byte(b);
            } else {
                self.outside_byte(b);
            }
            rest = tail;
        }
    }

    /// Takes the plain bytes at the start of `bytes` inside a string (up to a quote, a
    /// backslash or, in text, a byte of a multi-byte character) and says how many it took.
    fn plain_run(&mut self, bytes: &[u8]) -> usize {
        if self.counting {
            let run = bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b >= 0x80)
                .unwrap_or(bytes.len());
            // ASCII characters are never CJK: one "other" character each.
            self.other_chars += run as u64;
            run
        } else {
            let run = bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .unwrap_or(bytes.len());
            let kept = run.min(self.string.len().saturating_sub(self.string_len));
            if let (Some(to), Some(from)) = (
                self.string.get_mut(self.string_len..self.string_len + kept),
                bytes.get(..kept),
            ) {
                to.copy_from_slice(from);
                self.string_len += kept;
            }
            run
        }
    }

    /// What the response said so far (call at its end).
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            estimated_completion: self.cjk_chars.div_ceil(2) + self.other_chars.div_ceil(4),
        }
    }

    fn outside_byte(&mut self, b: u8) {
        if let Some(n) = self.number {
            if b.is_ascii_digit() {
                self.number = Some(n.saturating_mul(10).saturating_add(u64::from(b - b'0')));
                return;
            }
            self.number = None;
            // A later report (the final chunk) wins over an earlier one.
            match self.value_key.take() {
                _ if n > MAX_REPORTED_TOKENS => {}
                Some(Key::PromptTokens) => self.prompt_tokens = Some(n),
                Some(Key::CompletionTokens) => self.completion_tokens = Some(n),
                _ => {}
            }
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.string_len = 0;
                self.counting = self.value_key == Some(Key::Text);
                self.pending_key = None;
            }
            b':' => {
                self.value_key = self.pending_key.take();
            }
            b'0'..=b'9'
                if matches!(
                    self.value_key,
                    Some(Key::PromptTokens | Key::CompletionTokens)
                ) =>
            {
                self.number = Some(u64::from(b - b'0'));
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => {
                self.pending_key = None;
                self.value_key = None;
            }
        }
    }

    fn string_byte(&mut self, b: u8) {
        if self.unicode_left > 0 {
            self.unicode_left -= 1;
            self.unicode_value = self.unicode_value * 16 + char::from(b).to_digit(16).unwrap_or(0);
            if self.unicode_left == 0 {
                self.count(self.unicode_value);
            }
            return;
        }
        if self.escape {
            self.escape = false;
            if b == b'u' {
                self.unicode_left = 4;
                self.unicode_value = 0;
            } else {
                self.count(u32::from(b));
            }
            return;
        }
        match b {
            b'\\' => self.escape = true,
            b'"' => {
                self.in_string = false;
                if self.counting {
                    self.counting = false;
                    self.value_key = None;
                } else {
                    self.pending_key = self
                        .string
                        .get(..self.string_len)
                        .filter(|key| key.len() <= MAX_KEY)
                        .map(classify);
                    self.value_key = None;
                }
            }
            _ if self.counting => self.utf8_byte(b),
            _ => {
                if let Some(slot) = self.string.get_mut(self.string_len) {
                    *slot = b;
                    self.string_len += 1;
                }
            }
        }
    }

    /// Decodes UTF-8 just enough to tell CJK characters from others.
    fn utf8_byte(&mut self, b: u8) {
        match b {
            0x80..=0xBF if self.utf8_left > 0 => {
                self.code_point = (self.code_point << 6) | u32::from(b & 0x3F);
                self.utf8_left -= 1;
                if self.utf8_left == 0 {
                    self.count(self.code_point);
                }
            }
            0xC0..=0xDF => self.start_char(u32::from(b & 0x1F), 1),
            0xE0..=0xEF => self.start_char(u32::from(b & 0x0F), 2),
            0xF0..=0xF7 => self.start_char(u32::from(b & 0x07), 3),
            _ => {
                self.utf8_left = 0;
                self.count(u32::from(b));
            }
        }
    }

    fn start_char(&mut self, bits: u32, continuation: u8) {
        self.code_point = bits;
        self.utf8_left = continuation;
    }

    fn count(&mut self, code_point: u32) {
        if !self.counting {
            return;
        }
        if is_cjk(code_point) {
            self.cjk_chars += 1;
        } else {
            self.other_chars += 1;
        }
    }
}

/// The characters estimated at two a token (the rest at four), as the original counts.
pub fn is_cjk(c: u32) -> bool {
    matches!(c,
        0x3040..=0x30FF      // kana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // hangul
        | 0xF900..=0xFAFF    // compatibility ideographs
        | 0x20000..=0x2FFFF) // extensions B and later
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn scan_in_pieces(body: &[u8], piece: usize) -> Usage {
        let mut s = UsageScanner::new();
        for chunk in body.chunks(piece) {
            s.feed(chunk);
        }
        s.usage()
    }

    #[test]
    fn reads_the_usage_of_a_json_answer() {
        let body = br#"{"id":"x","choices":[{"message":{"role":"assistant","content":"hello"}}],
            "usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,
            "prompt_tokens_details":{"cached_tokens":5}}}"#;
        for piece in [1, 3, body.len()] {
            let u = scan_in_pieces(body, piece);
            assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(12), Some(34)));
            assert_eq!(u.charge(999), 46);
        }
    }

    #[test]
    fn reads_the_final_chunk_of_a_stream() {
        let mut body = Vec::new();
        for i in 0..5 {
            body.extend_from_slice(
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n")
                    .as_bytes(),
            );
        }
        body.extend_from_slice(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n");
        for piece in [1, 7, body.len()] {
            let u = scan_in_pieces(&body, piece);
            assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(7), Some(5)));
        }
    }

    /// A Responses answer (passed through from a backend that serves them) reports
    /// `input_tokens`/`output_tokens`, with details the scanner must not take for them.
    #[test]
    fn reads_the_usage_of_a_responses_answer_and_its_completed_event() {
        let body = br#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],
            "usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":4},"output_tokens":6,"output_tokens_details":{"reasoning_tokens":2},"total_tokens":17}}"#;
        for piece in [1, 5, body.len()] {
            let u = scan_in_pieces(body, piece);
            assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(11), Some(6)));
            assert_eq!(u.charge(999), 17);
        }
        // Streamed: `response.created` carries `usage: null`, `response.completed` the counts.
        let stream = concat!(
            "event: response.created\n",
            r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","output":[],"usage":null}}"#,
            "\n\nevent: response.output_text.delta\n",
            r#"data: {"type":"response.output_text.delta","sequence_number":1,"delta":"hello"}"#,
            "\n\nevent: response.completed\n",
            r#"data: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","status":"completed","usage":{"input_tokens":8,"input_tokens_details":{"cached_tokens":0},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":11}}}"#,
            "\n\n"
        );
        for piece in [1, 9, stream.len()] {
            let u = scan_in_pieces(stream.as_bytes(), piece);
            assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(8), Some(3)));
        }
    }

    #[test]
    fn estimates_when_no_usage_is_reported() {
        // 20 latin characters (5 tokens) and 4 CJK characters (2 tokens), one of them escaped.
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"abcdefghijklmnopqrst\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"你好世\\u754c\"}}]}\n\ndata: [DONE]\n\n";
        for piece in [1, 2, 5, body.len()] {
            let u = scan_in_pieces(body.as_bytes(), piece);
            assert_eq!(u.prompt_tokens, None);
            assert_eq!(u.estimated_completion, 7, "piece {piece}");
            assert_eq!(u.charge(100), 107);
        }
    }

    #[test]
    fn keys_inside_text_are_not_keys() {
        let body = br#"{"choices":[{"message":{"content":"\"prompt_tokens\":999"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let u = scan_in_pieces(body, 1);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(3), Some(4)));
    }
    /// Found through a real Envoy (`test_hostile_input.py`): a backend reporting an absurd
    /// usage sank the model's token budget into debt, and every later request got a 429.
    #[test]
    fn absurd_counts_are_not_believed() {
        let body =
            br#"{"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":10000001}}"#;
        for piece in [1, body.len()] {
            let u = scan_in_pieces(body, piece);
            assert_eq!((u.prompt_tokens, u.completion_tokens), (None, None));
            assert_eq!(u.charge(40), 40);
        }
        // The last believable report stands.
        let body = br#"data: {"usage":{"prompt_tokens":5,"completion_tokens":10000000}}

data: {"usage":{"prompt_tokens":18446744073709551616}}

"#;
        let u = scan_in_pieces(body, 3);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (Some(5), Some(MAX_REPORTED_TOKENS))
        );
    }
}
