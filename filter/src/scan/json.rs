//! Finds the top-level `"model"` of a JSON object body, validating the JSON read on the way.
//!
//! A pushdown state machine fed chunk by chunk. It keeps the container stack (bounded), the key
//! being read when that key could still be `model`, and the model value; nothing else is kept, so
//! a 5 MB prompt costs no memory. It stops at the first top-level `model`: what follows is not
//! our business, and the backend judges it.

use super::ScanOutcome;
use crate::bytes::u64_le;

/// Deeper nesting than this is refused: nobody sends it legitimately, and it bounds the stack.
pub const MAX_DEPTH: usize = 128;

const MODEL_KEY: &[u8] = b"model";
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

/// Where the decoded characters of the string being read go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// An ordinary string value: validated, not kept.
    Skip,
    /// A key of a nested object: validated, not kept.
    NestedKey,
    /// A key of the top-level object: kept while it can still be `model`.
    Key,
    /// The value of the top-level `model`.
    Model,
    /// The value of an extra top-level field asked for (by position in `fields`).
    Field(usize),
}

/// Which top-level value comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Other,
    Model,
    Field(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    /// Plain characters.
    None,
    /// After a backslash.
    Backslash,
    /// Inside `\uXXXX`: digits read so far and their value.
    Unicode { digits: u8, value: u32 },
    /// After a high surrogate: a `\` must follow.
    LowBackslash { high: u32 },
    /// After a high surrogate and `\`: a `u` must follow.
    LowU { high: u32 },
    /// Reading the low surrogate's digits.
    LowUnicode { high: u32, digits: u8, value: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first byte: a BOM may come.
    Start {
        bom: usize,
    },
    /// Expecting the top-level `{`.
    Root,
    /// Expecting a value.
    Value,
    /// Expecting the value of a top-level key we look for (`model` must be a string).
    TargetValue(Target),
    /// After `{`: a key or `}`.
    FirstKey,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon(Target),
    /// After `[`: a value or `]`.
    FirstElement,
    /// After a value: `,` or the closing bracket.
    AfterValue,
    Str {
        sink: Sink,
        esc: Esc,
    },
    Number(Num),
    Literal {
        word: &'static [u8],
        matched: usize,
    },
}

/// Feed it the body; it answers as soon as the model is known (or cannot be).
#[derive(Debug)]
pub struct JsonModelScanner {
    state: State,
    stack: Vec<Container>,
    /// The key or model value being decoded (only for `Sink::Key` and `Sink::Model`).
    text: Vec<u8>,
    max_model_len: usize,
    /// Extra top-level fields to find (`with_field`), and their values once read (strings, or
    /// the text of numbers).
    fields: Vec<Vec<u8>>,
    field_values: Vec<Option<String>>,
    /// The field whose number is being read.
    number_field: Option<usize>,
    /// The model, held while the field is still being looked for.
    model: Option<String>,
    /// Bytes fed so far, and how far in the model had been read.
    consumed: usize,
    model_seen_at: Option<usize>,
    done: Option<ScanOutcome>,
    seen_any: bool,
    /// Where in the body the byte being stepped is.
    at: usize,
    /// Where the model's string starts (its opening quote), then where it ends (past the
    /// closing quote): what a fallback rewrites.
    model_start: usize,
    model_span: Option<(usize, usize)>,
}

/// Field values past this are cut: a session key needs no more to hash well.
const MAX_FIELD_BYTES: usize = 256;

/// How far past the model extra fields are sought (`max_tokens` sits right after the model in
/// what the SDKs send; a 4 MB prompt after the model is not read for it).
pub const FIELD_LOOKAHEAD: usize = 64 * 1024;

impl JsonModelScanner {
    pub fn new(max_model_len: usize) -> Self {
        JsonModelScanner {
            state: State::Start { bom: 0 },
            stack: Vec::new(),
            text: Vec::new(),
            max_model_len,
            fields: Vec::new(),
            field_values: Vec::new(),
            number_field: None,
            consumed: 0,
            at: 0,
            model_start: 0,
            model_span: None,
            model_seen_at: None,
            model: None,
            done: None,
            seen_any: false,
        }
    }

    /// Also finds the top-level string field `name`: the answer then waits until both are read,
    /// or the object ends.
    pub fn with_field(mut self, name: &str) -> Self {
        if !self.fields.iter().any(|f| f == name.as_bytes()) {
            self.fields.push(name.as_bytes().to_vec());
            self.field_values.push(None);
        }
        self
    }

    /// A `with_field` value, when the body had it as a string or a number.
    pub fn field(&self, name: &str) -> Option<&str> {
        let at = self.fields.iter().position(|f| f == name.as_bytes())?;
        self.field_values.get(at)?.as_deref()
    }

    /// The model, once read, while the extra fields are still being looked for.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Bytes still to read for extra fields after the model (`None` before the model): what
    /// the next read may take at once.
    pub fn lookahead_left(&self) -> Option<usize> {
        let seen_at = self.model_seen_at?;
        Some(FIELD_LOOKAHEAD.saturating_sub(self.consumed.saturating_sub(seen_at)))
    }

    fn wants_field(&self) -> bool {
        self.field_values.iter().any(Option::is_none)
    }

    /// Records a field's value; answers when that was the last thing missing.
    fn found_field(&mut self, at: usize, value: String) -> Option<Step> {
        if let Some(slot) = self.field_values.get_mut(at) {
            *slot = Some(value);
        }
        if self.wants_field() {
            return None;
        }
        self.model
            .take()
            .map(|model| Step::Done(ScanOutcome::Found(model)))
    }

    /// Reads the next bytes of the body. Once the outcome is not `NeedMore` it never changes.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanOutcome {
        if let Some(done) = &self.done {
            return done.clone();
        }
        if !chunk.is_empty() {
            self.seen_any = true;
        }
        // Once the model is read, extra fields are sought only a little further: a large body
        // is not read to its end for them.
        let chunk = match self.lookahead_left() {
            Some(left) => chunk.get(..left.min(chunk.len())).unwrap_or(chunk),
            None => chunk,
        };
        let mut outcome = self.run(chunk);
        self.consumed = self.consumed.saturating_add(chunk.len());
        if outcome == ScanOutcome::NeedMore {
            if self.model.is_some() && self.model_seen_at.is_none() {
                self.model_seen_at = Some(self.consumed);
            }
            if self.lookahead_left() == Some(0) {
                outcome = self
                    .model
                    .take()
                    .map_or(ScanOutcome::NeedMore, ScanOutcome::Found);
            }
        }
        if outcome != ScanOutcome::NeedMore {
            self.done = Some(outcome.clone());
            self.text = Vec::new();
            self.stack = Vec::new();
        }
        outcome
    }

    /// Where the model's JSON string sits in the body: from its opening quote to just past its
    /// closing quote (escapes included, as written).
    pub fn model_span(&self) -> Option<(usize, usize)> {
        self.model_span
    }

    /// The body has ended: if the model was not decided yet, the JSON is cut short.
    pub fn finish(&mut self) -> ScanOutcome {
        if let Some(done) = &self.done {
            return done.clone();
        }
        let outcome = if !self.seen_any || matches!(self.state, State::Start { .. } | State::Root) {
            ScanOutcome::Invalid("the request body is empty".into())
        } else {
            ScanOutcome::Invalid("the JSON body ends before it is complete".into())
        };
        self.done = Some(outcome.clone());
        outcome
    }

    fn run(&mut self, chunk: &[u8]) -> ScanOutcome {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            // Long string contents are the bulk of a prompt: skip them without the state match.
            if let State::Str {
                sink: Sink::Skip | Sink::NestedKey,
                esc: Esc::None,
            } = self.state
            {
                let plain = plain_string_bytes(chunk.get(i..).unwrap_or_default());
                i += plain;
                if plain > 0 {
                    continue;
                }
            }
            self.at = self.consumed.saturating_add(i);
            match self.step(b) {
                Step::Next => i += 1,
                Step::Again => {}
                Step::Done(outcome) => return outcome,
            }
        }
        ScanOutcome::NeedMore
    }

    fn step(&mut self, b: u8) -> Step {
        match self.state {
            State::Start { bom } => self.start(bom, b),
            State::Root => match b {
                _ if is_ws(b) => Step::Next,
                b'{' => self.open(Container::Object),
                _ => invalid("the request body must be a JSON object"),
            },
            State::Value | State::FirstElement => match b {
                _ if is_ws(b) => Step::Next,
                b']' if self.state == State::FirstElement => self.close(Container::Array),
                _ => self.begin_value(b),
            },
            State::TargetValue(target) => self.target_value(target, b),
            State::FirstKey | State::Key => match b {
                _ if is_ws(b) => Step::Next,
                b'}' if self.state == State::FirstKey => self.close(Container::Object),
                b'"' => {
                    let sink = if self.stack.len() == 1 {
                        Sink::Key
                    } else {
                        Sink::NestedKey
                    };
                    self.text.clear();
                    self.state = State::Str {
                        sink,
                        esc: Esc::None,
                    };
                    Step::Next
                }
                _ => invalid("expected a string key in an object"),
            },
            State::Colon(target) => match b {
                _ if is_ws(b) => Step::Next,
                b':' => {
                    self.state = match target {
                        Target::Other => State::Value,
                        _ => State::TargetValue(target),
                    };
                    Step::Next
                }
                _ => invalid("expected `:` after an object key"),
            },
            State::AfterValue => match (b, self.stack.last()) {
                (_, _) if is_ws(b) => Step::Next,
                (b',', Some(Container::Object)) => {
                    self.state = State::Key;
                    Step::Next
                }
                (b',', Some(Container::Array)) => {
                    self.state = State::Value;
                    Step::Next
                }
                (b'}', Some(Container::Object)) => self.close(Container::Object),
                (b']', Some(Container::Array)) => self.close(Container::Array),
                _ => invalid("expected `,` or a closing bracket"),
            },
            State::Str { sink, esc } => self.string_byte(sink, esc, b),
            State::Number(num) => self.number_byte(num, b),
            State::Literal { word, matched } => self.literal_byte(word, matched, b),
        }
    }

    /// Before the first byte: a byte order mark may come (once per body: cold).
    #[cold]
    #[inline(never)]
    fn start(&mut self, bom: usize, b: u8) -> Step {
        if BOM.get(bom) == Some(&b) {
            self.state = if bom + 1 == BOM.len() {
                State::Root
            } else {
                State::Start { bom: bom + 1 }
            };
            return Step::Next;
        }
        if bom > 0 {
            return invalid("the body starts with a broken byte order mark");
        }
        self.state = State::Root;
        Step::Again
    }

    /// The first byte of a top-level value we look for (once per such key: cold). `model`
    /// must be a string; a field is kept as a string or the text of a number.
    #[cold]
    #[inline(never)]
    fn target_value(&mut self, target: Target, b: u8) -> Step {
        match (b, target) {
            _ if is_ws(b) => Step::Next,
            (b'"', Target::Model | Target::Field(_)) => {
                self.text.clear();
                self.model_start = self.at;
                let sink = match target {
                    Target::Field(at) => Sink::Field(at),
                    _ => Sink::Model,
                };
                self.state = State::Str {
                    sink,
                    esc: Esc::None,
                };
                Step::Next
            }
            (_, Target::Model) => invalid("`model` must be a string"),
            // A number is kept as its text (`max_tokens`).
            (b'-' | b'0'..=b'9', Target::Field(at)) => {
                self.text.clear();
                self.text.push(b);
                self.number_field = Some(at);
                self.begin_value(b)
            }
            // Any other value is no key; read it like any value.
            _ => self.begin_value(b),
        }
    }

    /// Inside `true`, `false` or `null`.
    fn literal_byte(&mut self, word: &'static [u8], matched: usize, b: u8) -> Step {
        if word.get(matched) != Some(&b) {
            return invalid("invalid literal (expected true, false or null)");
        }
        self.state = if matched + 1 == word.len() {
            State::AfterValue
        } else {
            State::Literal {
                word,
                matched: matched + 1,
            }
        };
        Step::Next
    }

    fn begin_value(&mut self, b: u8) -> Step {
        match b {
            b'{' => self.open(Container::Object),
            b'[' => self.open(Container::Array),
            b'"' => {
                self.state = State::Str {
                    sink: Sink::Skip,
                    esc: Esc::None,
                };
                Step::Next
            }
            b'-' => {
                self.state = State::Number(Num::Minus);
                Step::Next
            }
            b'0' => {
                self.state = State::Number(Num::Zero);
                Step::Next
            }
            b'1'..=b'9' => {
                self.state = State::Number(Num::Int);
                Step::Next
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => invalid("expected a JSON value"),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Step {
        self.state = State::Literal { word, matched: 1 };
        Step::Next
    }

    fn open(&mut self, container: Container) -> Step {
        if self.stack.len() >= MAX_DEPTH {
            return invalid(&format!("JSON nested deeper than {MAX_DEPTH} levels"));
        }
        self.stack.push(container);
        self.state = match container {
            Container::Object => State::FirstKey,
            Container::Array => State::FirstElement,
        };
        Step::Next
    }

    fn close(&mut self, container: Container) -> Step {
        if self.stack.pop() != Some(container) {
            return invalid("mismatched closing bracket");
        }
        if self.stack.is_empty() {
            // The top-level object is complete.
            return Step::Done(match self.model.take() {
                Some(model) => ScanOutcome::Found(model),
                None => ScanOutcome::Absent,
            });
        }
        self.state = State::AfterValue;
        Step::Next
    }

    fn number_byte(&mut self, num: Num, b: u8) -> Step {
        let next = match (num, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
            _ if num.complete() => {
                self.state = State::AfterValue;
                if let Some(at) = self.number_field.take() {
                    let text =
                        String::from_utf8_lossy(&std::mem::take(&mut self.text)).into_owned();
                    if let Some(done) = self.found_field(at, text) {
                        return done;
                    }
                }
                return Step::Again;
            }
            _ => return invalid("malformed number"),
        };
        if self.number_field.is_some() && self.text.len() < MAX_FIELD_BYTES {
            self.text.push(b);
        }
        self.state = State::Number(next);
        Step::Next
    }

    fn string_byte(&mut self, sink: Sink, esc: Esc, b: u8) -> Step {
        let next = match esc {
            Esc::None => match b {
                b'"' => return self.end_string(sink),
                b'\\' => Esc::Backslash,
                0..=0x1F => return invalid("control character inside a JSON string"),
                _ => return self.push_bytes(sink, &[b]),
            },
            Esc::Backslash => {
                let decoded = match b {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'/' => b'/',
                    b'b' => 0x08,
                    b'f' => 0x0C,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.state = State::Str {
                            sink,
                            esc: Esc::Unicode {
                                digits: 0,
                                value: 0,
                            },
                        };
                        return Step::Next;
                    }
                    _ => return invalid("invalid escape inside a JSON string"),
                };
                self.state = State::Str {
                    sink,
                    esc: Esc::None,
                };
                return self.push_bytes(sink, &[decoded]);
            }
            Esc::Unicode { digits, value } => return self.unicode_digit(sink, digits, value, b),
            Esc::LowBackslash { high } if b == b'\\' => Esc::LowU { high },
            Esc::LowU { high } if b == b'u' => Esc::LowUnicode {
                high,
                digits: 0,
                value: 0,
            },
            Esc::LowBackslash { .. } | Esc::LowU { .. } => {
                return invalid("lone surrogate in a \\u escape");
            }
            Esc::LowUnicode {
                high,
                digits,
                value,
            } => return self.low_surrogate_digit(sink, high, digits, value, b),
        };
        self.state = State::Str { sink, esc: next };
        Step::Next
    }

    /// A digit of `\uXXXX`: the character once four are read, unless it is a high surrogate,
    /// which waits for its low one.
    fn unicode_digit(&mut self, sink: Sink, digits: u8, value: u32, b: u8) -> Step {
        let Some(d) = hex(b) else {
            return invalid("invalid \\u escape inside a JSON string");
        };
        let value = value * 16 + d;
        let next = if digits < 3 {
            Esc::Unicode {
                digits: digits + 1,
                value,
            }
        } else if (0xD800..0xDC00).contains(&value) {
            Esc::LowBackslash { high: value }
        } else if (0xDC00..0xE000).contains(&value) {
            return invalid("lone surrogate in a \\u escape");
        } else {
            self.state = State::Str {
                sink,
                esc: Esc::None,
            };
            return self.push_char(sink, value);
        };
        self.state = State::Str { sink, esc: next };
        Step::Next
    }

    /// A digit of the low surrogate's `\uXXXX`: the pair's character once four are read.
    fn low_surrogate_digit(
        &mut self,
        sink: Sink,
        high: u32,
        digits: u8,
        value: u32,
        b: u8,
    ) -> Step {
        let Some(d) = hex(b) else {
            return invalid("invalid \\u escape inside a JSON string");
        };
        let value = value * 16 + d;
        if digits < 3 {
            self.state = State::Str {
                sink,
                esc: Esc::LowUnicode {
                    high,
                    digits: digits + 1,
                    value,
                },
            };
            return Step::Next;
        }
        if !(0xDC00..0xE000).contains(&value) {
            return invalid("lone surrogate in a \\u escape");
        }
        self.state = State::Str {
            sink,
            esc: Esc::None,
        };
        let code = 0x10000 + ((high - 0xD800) << 10) + (value - 0xDC00);
        self.push_char(sink, code)
    }

    fn push_char(&mut self, sink: Sink, code: u32) -> Step {
        let Some(c) = char::from_u32(code) else {
            return invalid("invalid \\u escape inside a JSON string");
        };
        let mut buf = [0u8; 4];
        let encoded = c.encode_utf8(&mut buf);
        self.push_bytes(sink, encoded.as_bytes())
    }

    fn push_bytes(&mut self, sink: Sink, bytes: &[u8]) -> Step {
        match sink {
            Sink::Skip | Sink::NestedKey => {}
            Sink::Key => {
                // One byte past the longest name we look for is enough to know it is another key.
                let longest = self
                    .fields
                    .iter()
                    .map(Vec::len)
                    .max()
                    .unwrap_or(0)
                    .max(MODEL_KEY.len());
                if self.text.len() <= longest {
                    self.text.extend_from_slice(bytes);
                }
            }
            Sink::Field(_) => {
                if self.text.len() < MAX_FIELD_BYTES {
                    self.text.extend_from_slice(bytes);
                }
            }
            Sink::Model => {
                self.text.extend_from_slice(bytes);
                if self.text.len() > self.max_model_len {
                    return invalid(&format!(
                        "`model` is longer than {} bytes",
                        self.max_model_len
                    ));
                }
            }
        }
        Step::Next
    }

    fn end_string(&mut self, sink: Sink) -> Step {
        match sink {
            Sink::Skip => self.state = State::AfterValue,
            Sink::NestedKey => self.state = State::Colon(Target::Other),
            Sink::Key => {
                // The first `model` (and field) wins; later duplicates are ordinary keys.
                let target = if self.text == MODEL_KEY && self.model.is_none() {
                    Target::Model
                } else if let Some(at) = self.fields.iter().position(|f| *f == self.text) {
                    // The first occurrence of a field wins.
                    match self.field_values.get(at) {
                        Some(None) => Target::Field(at),
                        _ => Target::Other,
                    }
                } else {
                    Target::Other
                };
                self.text.clear();
                self.state = State::Colon(target);
            }
            Sink::Model => {
                self.model_span = Some((self.model_start, self.at.saturating_add(1)));
                let text = std::mem::take(&mut self.text);
                match String::from_utf8(text) {
                    Ok(model) if model.trim().is_empty() => {
                        return invalid("`model` must be a non-empty string")
                    }
                    Ok(model) if !self.wants_field() => {
                        return Step::Done(ScanOutcome::Found(model))
                    }
                    Ok(model) => self.model = Some(model),
                    Err(_) => return invalid("`model` is not valid UTF-8"),
                }
                self.state = State::AfterValue;
            }
            Sink::Field(at) => {
                let text = std::mem::take(&mut self.text);
                if let Some(done) =
                    self.found_field(at, String::from_utf8_lossy(&text).into_owned())
                {
                    return done;
                }
                self.state = State::AfterValue;
            }
        }
        // A string just closed: for keys a colon follows, for values a comma or bracket.
        Step::Next
    }
}

enum Step {
    /// Byte consumed.
    Next,
    /// The state changed; look at the same byte again.
    Again,
    Done(ScanOutcome),
}

fn invalid(reason: &str) -> Step {
    Step::Done(ScanOutcome::Invalid(reason.to_string()))
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn hex(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

/// How many leading bytes of `bytes` are plain string content: not a quote, a backslash or a
/// control character. Eight bytes at a time (SWAR on a u64, which wasm32 has natively): the
/// prompt's strings are most of what the scanner reads.
fn plain_string_bytes(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `v` is zero (or, for `below`, under `n`) where the result has its high bit set;
    // bits above the first such byte may be wrong, the lowest one is exact.
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below = |v: u64, n: u8| v.wrapping_sub(ONES.wrapping_mul(u64::from(n))) & !v & HIGHS;
    let mut words = bytes.chunks_exact(8);
    let mut plain = 0;
    for word in words.by_ref() {
        let Some(v) = u64_le(word, 0) else {
            break;
        };
        let special = zero_byte(v ^ ONES.wrapping_mul(u64::from(b'"')))
            | zero_byte(v ^ ONES.wrapping_mul(u64::from(b'\\')))
            | below(v, 0x20);
        if special != 0 {
            return plain + (special.trailing_zeros() / 8) as usize;
        }
        plain += 8;
    }
    let tail = words.remainder();
    plain
        + tail
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .unwrap_or(tail.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn scan(body: &[u8]) -> ScanOutcome {
        let mut s = JsonModelScanner::new(64);
        match s.feed(body) {
            ScanOutcome::NeedMore => s.finish(),
            other => other,
        }
    }

    /// Feeds one byte at a time: every state must survive a chunk boundary.
    fn scan_bytewise(body: &[u8]) -> ScanOutcome {
        let mut s = JsonModelScanner::new(64);
        for b in body {
            let out = s.feed(std::slice::from_ref(b));
            if out != ScanOutcome::NeedMore {
                return out;
            }
        }
        s.finish()
    }

    fn found(m: &str) -> ScanOutcome {
        ScanOutcome::Found(m.to_string())
    }

    fn is_invalid(out: &ScanOutcome) -> bool {
        matches!(out, ScanOutcome::Invalid(_))
    }

    #[test]
    fn finds_the_model_wherever_it_is_at_top_level() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"model":"llama"}"#, "llama"),
            (
                br#"  {"messages":[{"role":"user","content":"hi \"model\""}],"model":"qwen"}"#,
                "qwen",
            ),
            (
                br#"{"a":{"model":"inner"},"b":[1,-2.5e+3,true,false,null,{}],"model":"outer"}"#,
                "outer",
            ),
            (b"\xEF\xBB\xBF{\"model\":\"bom\"}", "bom"),
            (br#"{"m\u006fdel":"escaped-key"}"#, "escaped-key"),
            (
                br#"{"model":"caf\u00e9 \ud83d\ude00 \/ \n"}"#,
                "caf\u{e9} \u{1F600} / \n",
            ),
            (br#"{"model":"first","model":"second"}"#, "first"),
            ("{\"model\":\"日本\"}".as_bytes(), "日本"),
        ];
        for (body, model) in cases {
            assert_eq!(
                scan(body),
                found(model),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(
                scan_bytewise(body),
                found(model),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn stops_at_the_model_without_reading_the_rest() {
        let mut s = JsonModelScanner::new(64);
        assert_eq!(s.feed(br#"{"model":"llama","prompt":"#), found("llama"));
        // Whatever follows, even garbage, does not change the answer.
        assert_eq!(s.feed(b"\x00 not json"), found("llama"));
        assert_eq!(s.finish(), found("llama"));
    }

    #[test]
    fn a_complete_object_without_model_is_absent() {
        for body in [
            &br#"{}"#[..],
            br#"{"messages":[{"model":"nested"}]}"#,
            br#"{"models":"x","mode":"y"}"#,
        ] {
            assert_eq!(scan(body), ScanOutcome::Absent);
            assert_eq!(scan_bytewise(body), ScanOutcome::Absent);
        }
    }

    #[test]
    fn needs_more_until_the_model_or_the_end() {
        let mut s = JsonModelScanner::new(64);
        assert_eq!(s.feed(br#"{"prompt":"a long"#), ScanOutcome::NeedMore);
        assert_eq!(s.feed(br#" prompt","mod"#), ScanOutcome::NeedMore);
        assert_eq!(s.feed(br#"el" : "x"#), ScanOutcome::NeedMore);
        assert_eq!(s.feed(br#"y"}"#), found("xy"));
    }

    #[test]
    fn malformed_json_is_invalid() {
        let bad: &[&[u8]] = &[
            b"",
            b"   ",
            b"[1,2]",
            b"\"model\"",
            br#"{"model" "x"}"#,
            br#"{"a":01,"model":"x"}"#,
            br#"{"a":1.,"model":"x"}"#,
            br#"{"a":-,"model":"x"}"#,
            br#"{"a":tru,"model":"x"}"#,
            br#"{"a":[1,],"model":"x"}"#,
            br#"{"a":1,}"#,
            br#"{"a":"\q","model":"x"}"#,
            br#"{"a":"\u12G4","model":"x"}"#,
            br#"{"a":"\ud800x","model":"x"}"#,
            br#"{"a":"\udc00","model":"x"}"#,
            b"{\"a\":\"line\nbreak\",\"model\":\"x\"}",
            br#"{"a":[}"#,
            br#"{"prompt":"cut"#,
            b"\xEF\xBB{}",
            br#"{'model':'x'}"#,
        ];
        for body in bad {
            assert!(is_invalid(&scan(body)), "{}", String::from_utf8_lossy(body));
            assert!(
                is_invalid(&scan_bytewise(body)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_model_must_be_a_reasonable_string() {
        for body in [
            &br#"{"model":42}"#[..],
            br#"{"model":null}"#,
            br#"{"model":["a"]}"#,
            br#"{"model":""}"#,
            br#"{"model":"  "}"#,
            b"{\"model\":\"\xFF\"}",
        ] {
            assert!(is_invalid(&scan(body)), "{}", String::from_utf8_lossy(body));
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(65));
        assert!(is_invalid(&scan(long.as_bytes())));
        let fits = format!(r#"{{"model":"{}"}}"#, "m".repeat(64));
        assert_eq!(scan(fits.as_bytes()), found(&"m".repeat(64)));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!(r#"{{"a":{}"#, "[".repeat(MAX_DEPTH));
        assert!(is_invalid(&scan(deep.as_bytes())));
        let ok = format!(
            r#"{{"a":{}{},"model":"m"}}"#,
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert_eq!(scan(ok.as_bytes()), found("m"));
    }

    #[test]
    fn a_multi_megabyte_prompt_costs_no_memory() {
        let mut s = JsonModelScanner::new(64);
        assert_eq!(s.feed(br#"{"prompt":""#), ScanOutcome::NeedMore);
        let filler = vec![b'x'; 1 << 20];
        for _ in 0..5 {
            assert_eq!(s.feed(&filler), ScanOutcome::NeedMore);
        }
        assert!(s.text.capacity() <= 64);
        assert_eq!(s.feed(br#"","model":"late"}"#), found("late"));
    }

    #[test]
    fn finds_an_extra_field_before_or_after_the_model() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (br#"{"user":"u-1","model":"m"}"#, Some("u-1")),
            (
                br#"{"model":"m","messages":[{"user":"inner"}],"user":"u-2"}"#,
                Some("u-2"),
            ),
            (br#"{"model":"m","user":42}"#, Some("42")),
            (br#"{"model":"m","user":{"id":1}}"#, None),
            (br#"{"model":"m"}"#, None),
        ];
        for (body, user) in cases {
            let mut s = JsonModelScanner::new(64).with_field("user");
            let mut out = ScanOutcome::NeedMore;
            for b in *body {
                out = s.feed(std::slice::from_ref(b));
                if out != ScanOutcome::NeedMore {
                    break;
                }
            }
            assert_eq!(out, found("m"), "{}", String::from_utf8_lossy(body));
            assert_eq!(s.field("user"), *user, "{}", String::from_utf8_lossy(body));
        }
        // With the field found first, the model still ends the scan at once.
        let mut s = JsonModelScanner::new(64).with_field("user");
        assert_eq!(s.feed(br#"{"user":"u","model":"m","rest":"#), found("m"));
        // A field without a model is still a body without a model.
        let mut s = JsonModelScanner::new(64).with_field("user");
        assert_eq!(s.feed(br#"{"user":"u"}"#), ScanOutcome::Absent);
        assert_eq!(s.field("user"), Some("u"));
    }

    #[test]
    fn extra_fields_are_sought_only_a_little_past_the_model() {
        let mut s = JsonModelScanner::new(64).with_field("max_tokens");
        assert_eq!(
            s.feed(br#"{"model":"m","messages":[{"content":""#),
            ScanOutcome::NeedMore
        );
        let filler = vec![b'x'; 16 * 1024];
        let mut out = ScanOutcome::NeedMore;
        let mut fed = 0;
        while out == ScanOutcome::NeedMore && fed < 1 << 20 {
            out = s.feed(&filler);
            fed += filler.len();
        }
        assert_eq!(out, found("m"));
        assert!(
            fed <= FIELD_LOOKAHEAD + filler.len(),
            "read {fed} bytes past the model"
        );
        assert_eq!(s.field("max_tokens"), None);
    }

    #[test]
    fn plain_string_bytes_stops_where_a_byte_at_a_time_scan_does() {
        let naive = |b: &[u8]| {
            b.iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(b.len())
        };
        // Deterministic noise over the bytes that matter and UTF-8 bytes around them.
        let alphabet = [
            b'a', b' ', b'"', b'\\', 0x00, 0x1f, 0x20, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc,
            0xff,
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..40 {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        // Mostly plain bytes, so runs are long enough to cross words.
                        if state.is_multiple_of(4) {
                            alphabet[(state >> 8) as usize % alphabet.len()]
                        } else {
                            b'a' + (state >> 8) as u8 % 26
                        }
                    })
                    .collect();
                assert_eq!(plain_string_bytes(&bytes), naive(&bytes), "{bytes:?}");
            }
        }
    }

    #[test]
    fn the_model_span_covers_the_string_as_written() {
        let body = br#"{"messages":[{"model":"no"}], "model" : "ll\u0061ma", "max_tokens": 5}"#;
        for split in 0..body.len() {
            let mut s = JsonModelScanner::new(256).with_field("max_tokens");
            let (a, b) = body.split_at(split);
            if s.feed(a) == ScanOutcome::NeedMore {
                s.feed(b);
            }
            let (start, end) = s.model_span().unwrap();
            assert_eq!(&body[start..end], br#""ll\u0061ma""#, "split at {split}");
        }
    }
    /// Issue 10's list of hostile bodies: each is refused (or read) the same whole and byte by
    /// byte, and none makes the scanner hold more than its bounds.
    #[test]
    fn hostile_bodies_are_refused_within_the_bounds() {
        let refused: &[&[u8]] = &[
            br#"{"temperature":NaN,"model":"m"}"#,
            br#"{"temperature":-Infinity,"model":"m"}"#,
            br#"{"model":NaN}"#,
            b"\xEF\xBB\xBF\xEF\xBB\xBF{\"model\":\"m\"}",
            b"\xFF\xFE{\x00\"\x00m\x00",
            br#"{"model":"a\ud800"}"#,
            br#"{"model":{"model":"m"}}"#,
            br#"{"model":true}"#,
        ];
        for body in refused {
            assert!(is_invalid(&scan(body)), "{}", String::from_utf8_lossy(body));
            assert!(
                is_invalid(&scan_bytewise(body)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // What follows the model is not read (the backend judges it).
        assert_eq!(scan(b"{\"model\":\"m\"\x00}"), found("m"));
        // An escaped NUL is a (strange) name like any other: no instance serves it, a 404 says so.
        assert_eq!(scan(br#"{"model":"\u0000"}"#), found("\0"));
        // Deep nesting: refused at MAX_DEPTH, the stack never grows past it.
        let mut s = JsonModelScanner::new(64);
        let deep = format!(r#"{{"a":{}"#, "[".repeat(100_000));
        assert!(is_invalid(&s.feed(deep.as_bytes())));
        let mut s2 = JsonModelScanner::new(64);
        for b in deep.as_bytes().iter().take(MAX_DEPTH + 10) {
            s2.feed(std::slice::from_ref(b));
        }
        assert!(s2.stack.len() <= MAX_DEPTH);
        assert_eq!(s.stack.capacity(), 0);
        // A 5 MB model string is refused as soon as it passes the bound, holding no more.
        let mut s = JsonModelScanner::new(64);
        assert_eq!(s.feed(br#"{"model":""#), ScanOutcome::NeedMore);
        let mut out = ScanOutcome::NeedMore;
        let mut fed = 0;
        while out == ScanOutcome::NeedMore && fed < 5 << 20 {
            out = s.feed(&[b'm'; 16]);
            fed += 16;
            assert!(s.text.len() <= 64 + 4);
        }
        assert!(is_invalid(&out) && fed <= 80, "{out:?} after {fed}");
        // Duplicate keys: the first top-level `model` decides, even when later ones differ in
        // kind.
        assert_eq!(scan(br#"{"model":"a","model":42}"#), found("a"));
        assert_eq!(
            scan_bytewise(br#"{"model":"a","model":{"x":1}}"#),
            found("a")
        );
    }
}
