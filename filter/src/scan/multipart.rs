//! Finds the `model` field of a multipart/form-data body (RFC 7578) as it streams past.
//!
//! Only part headers and the `model` field's content are kept; any other part (the 20 MB audio
//! file) is searched for the next delimiter and dropped, keeping at most a delimiter's length of
//! bytes between chunks.

use super::ScanOutcome;

/// A body that shows no delimiter this far in is not multipart.
const MAX_PREAMBLE_BYTES: usize = 64 * 1024;
/// The rest of a delimiter line (`--` or padding) is short.
const MAX_DELIMITER_LINE: usize = 256;

/// The boundary parameter of a `multipart/form-data` content type (1 to 70 characters).
pub fn boundary_from_content_type(content_type: &str) -> Option<String> {
    let (_, params) = content_type.split_once(';')?;
    parameters(params)
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value)
        .filter(|b| (1..=70).contains(&b.len()) && !b.bytes().any(|c| c == b'\r' || c == b'\n'))
}

/// `name=value` pairs of a header's parameters; values may be quoted (with `\` escapes).
fn parameters(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = params.chars().peekable();
    loop {
        // Skip separators and whitespace before a name.
        while chars.peek().is_some_and(|c| *c == ';' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() && chars.peek().is_none() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => value.extend(chars.next()),
                        _ => value.push(c),
                    }
                }
            }
            while let Some(&c) = chars.peek() {
                if c == ';' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((name.trim().to_string(), value.trim().to_string()));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before the first delimiter; counts the bytes seen.
    Preamble { seen: usize },
    /// After `--boundary`: the rest of the line tells a part from the end.
    DelimiterLine { line: Vec<u8> },
    /// A part's headers, up to the empty line.
    Headers { block: Vec<u8> },
    /// A part's content, up to the next delimiter; kept only for the `model` field.
    Content { keep: Keep },
}

/// Whose content a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    Model,
    Field,
}

/// Field values past this are not kept: a session key needs no more to hash well.
const MAX_FIELD_BYTES: usize = 256;

/// Feed it the body; it answers as soon as the `model` field is complete (or cannot be).
#[derive(Debug)]
pub struct MultipartModelScanner {
    /// `--boundary`: the first delimiter may open the body without a line break.
    first_delimiter: Vec<u8>,
    /// `\n--boundary`: every later delimiter (a `\r` before it belongs to the delimiter too).
    delimiter: Vec<u8>,
    state: State,
    /// Bytes that may be the start of a delimiter split across chunks, or the `model` content.
    pending: Vec<u8>,
    max_model_len: usize,
    max_part_header_bytes: usize,
    /// The extra field to find (`with_field`), its value once read, and the model held meanwhile.
    field: Option<String>,
    field_value: Option<String>,
    model: Option<String>,
    done: Option<ScanOutcome>,
}

impl MultipartModelScanner {
    pub fn new(boundary: &str, max_model_len: usize, max_part_header_bytes: usize) -> Self {
        let first_delimiter = [b"--", boundary.as_bytes()].concat();
        let delimiter = [b"\n", first_delimiter.as_slice()].concat();
        MultipartModelScanner {
            first_delimiter,
            delimiter,
            state: State::Preamble { seen: 0 },
            pending: Vec::new(),
            max_model_len,
            max_part_header_bytes,
            field: None,
            field_value: None,
            model: None,
            done: None,
        }
    }

    /// Also finds the form field `name`: the answer then waits until both are read, or the
    /// body ends.
    pub fn with_field(mut self, name: &str) -> Self {
        self.field = Some(name.to_string());
        self
    }

    /// The `with_field` value, when the body had it.
    pub fn field(&self) -> Option<&str> {
        self.field_value.as_deref()
    }

    fn wants_field(&self) -> bool {
        self.field.is_some() && self.field_value.is_none()
    }

    /// Reads the next bytes of the body. Once the outcome is not `NeedMore` it never changes.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanOutcome {
        if let Some(done) = &self.done {
            return done.clone();
        }
        let outcome = self.run(chunk);
        if outcome != ScanOutcome::NeedMore {
            self.done = Some(outcome.clone());
            self.pending = Vec::new();
            self.state = State::Content {
                keep: Keep::Nothing,
            };
        }
        outcome
    }

    /// The body has ended before the `model` field was complete.
    pub fn finish(&mut self) -> ScanOutcome {
        if let Some(done) = &self.done {
            return done.clone();
        }
        // A closing delimiter answers `Absent` as soon as it is read, so this body is cut short.
        let outcome =
            ScanOutcome::Invalid("the multipart body ends before its closing delimiter".into());
        self.done = Some(outcome.clone());
        outcome
    }

    fn run(&mut self, chunk: &[u8]) -> ScanOutcome {
        // Bytes held back from the last chunk are looked at again, in front of this one.
        let joined;
        let mut input: &[u8] = if self.pending.is_empty() || self.keeps_content() {
            chunk
        } else {
            joined = [std::mem::take(&mut self.pending).as_slice(), chunk].concat();
            &joined
        };
        while !input.is_empty() {
            let state = std::mem::replace(
                &mut self.state,
                State::Content {
                    keep: Keep::Nothing,
                },
            );
            let (next, rest) = match state {
                State::Preamble { seen } => self.preamble(seen, input),
                State::DelimiterLine { line } => delimiter_line(line, input),
                State::Headers { block } => self.headers(block, input),
                State::Content {
                    keep: Keep::Nothing,
                } => self.skip_content(input),
                State::Content { keep } => self.keep_content(keep, input),
            };
            match next {
                Next::State(state) => self.state = state,
                // The closing delimiter: a model held while looking for the field is the answer.
                Next::Done(ScanOutcome::Absent) => {
                    return match self.model.take() {
                        Some(model) => ScanOutcome::Found(model),
                        None => ScanOutcome::Absent,
                    }
                }
                Next::Done(outcome) => return outcome,
            }
            input = rest;
        }
        ScanOutcome::NeedMore
    }

    /// Runs over bytes already taken out of `pending` (the rest of a chunk after a kept part).
    fn run_owned(&mut self, bytes: &[u8]) -> ScanOutcome {
        if bytes.is_empty() {
            return ScanOutcome::NeedMore;
        }
        self.run(bytes)
    }

    fn keeps_content(&self) -> bool {
        matches!(
            self.state,
            State::Content {
                keep: Keep::Model | Keep::Field
            }
        )
    }

    fn preamble<'a>(&mut self, seen: usize, input: &'a [u8]) -> (Next, &'a [u8]) {
        if let Some(at) = find(input, &self.first_delimiter) {
            let after = input
                .get(at + self.first_delimiter.len()..)
                .unwrap_or_default();
            return (
                Next::State(State::DelimiterLine { line: Vec::new() }),
                after,
            );
        }
        let seen = seen + input.len();
        if seen > MAX_PREAMBLE_BYTES {
            let reason = "no multipart boundary delimiter in the body".to_string();
            return (Next::Done(ScanOutcome::Invalid(reason)), &[]);
        }
        self.hold_tail(input, self.first_delimiter.len());
        // The held bytes are seen again next time; don't count them twice.
        let seen = seen - self.pending.len();
        (Next::State(State::Preamble { seen }), &[])
    }

    fn headers<'a>(&mut self, mut block: Vec<u8>, input: &'a [u8]) -> (Next, &'a [u8]) {
        for (i, &b) in input.iter().enumerate() {
            block.push(b);
            let ended = block.ends_with(b"\n\n")
                || block.ends_with(b"\n\r\n")
                || block == b"\r\n"
                || block == b"\n";
            if ended {
                let keep = match part_name(&block) {
                    Some(name) if name == "model" && self.model.is_none() => Keep::Model,
                    Some(name)
                        if self.field.as_deref() == Some(name.as_str()) && self.wants_field() =>
                    {
                        Keep::Field
                    }
                    _ => Keep::Nothing,
                };
                let rest = input.get(i + 1..).unwrap_or_default();
                return (Next::State(State::Content { keep }), rest);
            }
            if block.len() > self.max_part_header_bytes {
                let reason = format!(
                    "multipart part headers longer than {} bytes",
                    self.max_part_header_bytes
                );
                return (Next::Done(ScanOutcome::Invalid(reason)), &[]);
            }
        }
        (Next::State(State::Headers { block }), &[])
    }

    fn skip_content<'a>(&mut self, input: &'a [u8]) -> (Next, &'a [u8]) {
        if let Some(at) = find(input, &self.delimiter) {
            let after = input.get(at + self.delimiter.len()..).unwrap_or_default();
            return (
                Next::State(State::DelimiterLine { line: Vec::new() }),
                after,
            );
        }
        self.hold_tail(input, self.delimiter.len());
        (
            Next::State(State::Content {
                keep: Keep::Nothing,
            }),
            &[],
        )
    }

    fn keep_content<'a>(&mut self, keep: Keep, input: &'a [u8]) -> (Next, &'a [u8]) {
        // Search only where a delimiter could newly appear: the kept content is small.
        let from = self.pending.len().saturating_sub(self.delimiter.len());
        self.pending.extend_from_slice(input);
        let found = self
            .pending
            .get(from..)
            .and_then(|tail| find(tail, &self.delimiter));
        let limit = match keep {
            Keep::Field => MAX_FIELD_BYTES,
            _ => self.max_model_len,
        };
        let Some(at) = found else {
            // Room for the longest value, its line break and a delimiter split across chunks.
            if self.pending.len() <= limit + self.delimiter.len() + 1 {
                return (Next::State(State::Content { keep }), &[]);
            }
            if keep == Keep::Field {
                // Too long to be a session key: skip it like any other part.
                let held = std::mem::take(&mut self.pending);
                self.hold_tail(&held, self.delimiter.len());
                return (
                    Next::State(State::Content {
                        keep: Keep::Nothing,
                    }),
                    &[],
                );
            }
            let reason = format!("`model` is longer than {} bytes", self.max_model_len);
            return (Next::Done(ScanOutcome::Invalid(reason)), &[]);
        };
        let at = from + at;
        let held = std::mem::take(&mut self.pending);
        let content = held.get(..at).unwrap_or_default();
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        let after = held
            .get(at + self.delimiter.len()..)
            .unwrap_or_default()
            .to_vec();
        if keep == Keep::Field {
            // Too long to be a session key: skipped, as when it arrives in small chunks (and
            // however it arrives, never kept past the bound).
            if content.len() <= MAX_FIELD_BYTES {
                self.field_value = Some(String::from_utf8_lossy(content).trim().to_string());
            }
        } else {
            match self.model_of(content) {
                Ok(model) => self.model = Some(model),
                Err(reason) => return (Next::Done(ScanOutcome::Invalid(reason)), &[]),
            }
        }
        if !self.wants_field() {
            if let Some(model) = self.model.take() {
                return (Next::Done(ScanOutcome::Found(model)), &[]);
            }
        }
        // Go on after the delimiter with what this chunk held beyond it.
        self.state = State::DelimiterLine { line: Vec::new() };
        let outcome = self.run_owned(&after);
        match outcome {
            ScanOutcome::NeedMore => {
                let state = std::mem::replace(
                    &mut self.state,
                    State::Content {
                        keep: Keep::Nothing,
                    },
                );
                (Next::State(state), &[])
            }
            done => (Next::Done(done), &[]),
        }
    }

    /// The `model` part's content as the model, or why it cannot be one.
    fn model_of(&self, content: &[u8]) -> Result<String, String> {
        match std::str::from_utf8(content) {
            _ if content.len() > self.max_model_len => Err(format!(
                "`model` is longer than {} bytes",
                self.max_model_len
            )),
            Ok(model) if !model.trim().is_empty() => Ok(model.trim().to_string()),
            Ok(_) => Err("the `model` field is empty".into()),
            Err(_) => Err("the `model` field is not valid UTF-8".to_string()),
        }
    }

    /// Keeps the last bytes of `input` that could begin a delimiter of `len` bytes.
    fn hold_tail(&mut self, input: &[u8], len: usize) {
        let keep = len.saturating_sub(1).min(input.len());
        self.pending.clear();
        self.pending
            .extend_from_slice(input.get(input.len() - keep..).unwrap_or_default());
    }
}

enum Next {
    State(State),
    Done(ScanOutcome),
}

/// The rest of a delimiter line: `--` ends the body, padding and a line break start a part.
fn delimiter_line(mut line: Vec<u8>, input: &[u8]) -> (Next, &[u8]) {
    let malformed = || {
        let reason = "malformed multipart delimiter line".to_string();
        (Next::Done(ScanOutcome::Invalid(reason)), &[][..])
    };
    for (i, &b) in input.iter().enumerate() {
        if b == b'-' && (line.is_empty() || line == b"-") {
            line.push(b);
            if line == b"--" {
                return (Next::Done(ScanOutcome::Absent), &[]);
            }
            continue;
        }
        match b {
            _ if line == b"-" => return malformed(),
            b'\n' => {
                let rest = input.get(i + 1..).unwrap_or_default();
                return (Next::State(State::Headers { block: Vec::new() }), rest);
            }
            b' ' | b'\t' | b'\r' if line.len() < MAX_DELIMITER_LINE => line.push(b),
            _ => return malformed(),
        }
    }
    (Next::State(State::DelimiterLine { line }), &[])
}

/// The field name of a part: `Content-Disposition: form-data; name="..."`.
fn part_name(block: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("content-disposition") {
            return None;
        }
        let value = value.trim();
        let (kind, params) = value.split_once(';').unwrap_or((value, ""));
        if !kind.trim().eq_ignore_ascii_case("form-data") {
            return None;
        }
        parameters(params)
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("name"))
            .map(|(_, v)| v)
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(offset) = haystack.get(from..)?.iter().position(|&b| b == first) {
        let at = from + offset;
        match haystack.get(at + 1..at + needle.len()) {
            Some(candidate) if candidate == rest => return Some(at),
            Some(_) => from = at + 1,
            // The needle would run past the end.
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn form(boundary: &str, parts: &[(&str, &[u8])], eol: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, content) in parts {
            body.extend_from_slice(format!("--{boundary}{eol}").as_bytes());
            let filename = if *name == "file" {
                "; filename=\"a.wav\""
            } else {
                ""
            };
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"{filename}{eol}")
                    .as_bytes(),
            );
            if *name == "file" {
                body.extend_from_slice(format!("Content-Type: audio/wav{eol}").as_bytes());
            }
            body.extend_from_slice(eol.as_bytes());
            body.extend_from_slice(content);
            body.extend_from_slice(eol.as_bytes());
        }
        body.extend_from_slice(format!("--{boundary}--{eol}").as_bytes());
        body
    }

    fn scan_in(body: &[u8], chunk: usize) -> ScanOutcome {
        let mut s = MultipartModelScanner::new("XyZ-42", 64, 1024);
        for piece in body.chunks(chunk) {
            let out = s.feed(piece);
            if out != ScanOutcome::NeedMore {
                return out;
            }
        }
        s.finish()
    }

    fn every_split(body: &[u8]) -> Vec<ScanOutcome> {
        [1, 2, 3, 7, 13, 64, body.len().max(1)]
            .iter()
            .map(|&c| scan_in(body, c))
            .collect()
    }

    fn found(m: &str) -> ScanOutcome {
        ScanOutcome::Found(m.to_string())
    }

    #[test]
    fn reads_the_boundary_parameter() {
        let b = |ct: &str| boundary_from_content_type(ct);
        assert_eq!(
            b("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            b("multipart/form-data; charset=utf-8; BOUNDARY=\"a;b c\"").as_deref(),
            Some("a;b c")
        );
        assert_eq!(
            b("multipart/form-data;boundary=----WebKitFormBoundary7MA4YWxk").as_deref(),
            Some("----WebKitFormBoundary7MA4YWxk")
        );
        assert_eq!(b("multipart/form-data"), None);
        assert_eq!(b("multipart/form-data; boundary="), None);
        assert_eq!(b("multipart/form-data; boundary=\"\""), None);
        assert_eq!(
            b(&format!("multipart/form-data; boundary={}", "x".repeat(71))),
            None
        );
    }

    #[test]
    fn finds_the_model_field_before_or_after_the_file() {
        let audio = vec![0xABu8; 5000];
        for eol in ["\r\n", "\n"] {
            let first = form("XyZ-42", &[("model", b"whisper-1"), ("file", &audio)], eol);
            let last = form(
                "XyZ-42",
                &[
                    ("file", &audio),
                    ("language", b"en"),
                    ("model", b"whisper-2"),
                ],
                eol,
            );
            for out in every_split(&first) {
                assert_eq!(out, found("whisper-1"));
            }
            for out in every_split(&last) {
                assert_eq!(out, found("whisper-2"));
            }
        }
    }

    #[test]
    fn stops_reading_once_the_model_is_known() {
        let mut s = MultipartModelScanner::new("b", 64, 1024);
        let head = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm1\r\n--b\r\n";
        assert_eq!(s.feed(head), found("m1"));
        assert_eq!(s.feed(b"anything at all"), found("m1"));
        assert_eq!(s.finish(), found("m1"));
    }

    #[test]
    fn a_file_that_looks_like_a_delimiter_prefix_is_skipped() {
        // Content holding `\n--XyZ-4` (a delimiter prefix) must not end the part.
        let tricky = b"data\n--XyZ-4 not yet\r\n--XyZ-4".to_vec();
        let body = form("XyZ-42", &[("file", &tricky), ("model", b"m")], "\r\n");
        for out in every_split(&body) {
            assert_eq!(out, found("m"));
        }
    }

    #[test]
    fn no_model_field_is_absent() {
        let body = form("XyZ-42", &[("file", b"abc"), ("prompt", b"hi")], "\r\n");
        for out in every_split(&body) {
            assert_eq!(out, ScanOutcome::Absent);
        }
        // Closing delimiter without a trailing line break.
        let mut body = form("XyZ-42", &[("file", b"abc")], "\r\n");
        body.truncate(body.len() - 2);
        for out in every_split(&body) {
            assert_eq!(out, ScanOutcome::Absent);
        }
    }

    #[test]
    fn a_field_named_like_model_is_not_the_model() {
        let body = form("XyZ-42", &[("model_name", b"x"), ("file", b"abc")], "\r\n");
        assert_eq!(scan_in(&body, 1000), ScanOutcome::Absent);
    }

    #[test]
    fn malformed_bodies_are_invalid() {
        let invalid = |out: ScanOutcome| matches!(out, ScanOutcome::Invalid(_));
        // No delimiter at all.
        assert!(invalid(scan_in(&vec![b'a'; MAX_PREAMBLE_BYTES + 10], 4096)));
        // Cut short in a part.
        let body = form("XyZ-42", &[("file", b"abc"), ("model", b"m")], "\r\n");
        assert!(invalid(scan_in(&body[..30], 7)));
        // Garbage after a delimiter.
        assert!(invalid(scan_in(b"--XyZ-42garbage\r\n", 3)));
        // Endless part headers.
        let mut endless = b"--XyZ-42\r\n".to_vec();
        endless.extend(vec![b'h'; 2000]);
        assert!(invalid(scan_in(&endless, 100)));
        // A model too long, or empty, or not UTF-8.
        let long = [b'm'; 65];
        for content in [&long[..], b"", b"  ", b"\xFF\xFE"] {
            let body = form("XyZ-42", &[("model", content)], "\r\n");
            for out in every_split(&body) {
                assert!(invalid(out), "{content:?}");
            }
        }
        // Empty body.
        assert!(invalid(scan_in(b"", 1)));
    }

    #[test]
    fn skipping_a_large_file_keeps_only_a_few_bytes() {
        let mut s = MultipartModelScanner::new("XyZ-42", 64, 1024);
        assert_eq!(
            s.feed(b"--XyZ-42\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n"),
            ScanOutcome::NeedMore
        );
        let block = vec![0x2Du8; 1 << 20]; // all '-': a worst case for the delimiter search
        for _ in 0..20 {
            assert_eq!(s.feed(&block), ScanOutcome::NeedMore);
            assert!(s.pending.len() < 16);
        }
        assert_eq!(
            s.feed(b"\r\n--XyZ-42\r\nContent-Disposition: form-data; name=model\r\n\r\nw\r\n--XyZ-42--"),
            found("w")
        );
    }

    #[test]
    fn finds_an_extra_field_before_or_after_the_model() {
        let audio = vec![0x11u8; 3000];
        let cases = [
            form(
                "XyZ-42",
                &[("user", b"u-1"), ("file", &audio), ("model", b"m")],
                "\r\n",
            ),
            form(
                "XyZ-42",
                &[("model", b"m"), ("file", &audio), ("user", b"u-1")],
                "\r\n",
            ),
        ];
        for body in &cases {
            for chunk in [1, 5, 64, body.len()] {
                let (out, s) = user_field_scan(body, chunk);
                assert_eq!(out, found("m"), "chunk {chunk}");
                assert_eq!(s.field(), Some("u-1"), "chunk {chunk}");
            }
        }
        // No such field: the model is the answer at the closing delimiter.
        let body = form("XyZ-42", &[("model", b"m"), ("file", &audio)], "\r\n");
        let mut s = MultipartModelScanner::new("XyZ-42", 64, 1024).with_field("user");
        assert_eq!(s.feed(&body), found("m"));
        assert_eq!(s.field(), None);
    }
    /// Scans `body` in `chunk`-byte pieces for the model and the `user` field.
    fn user_field_scan(body: &[u8], chunk: usize) -> (ScanOutcome, MultipartModelScanner) {
        let mut s = MultipartModelScanner::new("XyZ-42", 64, 1024).with_field("user");
        let mut out = ScanOutcome::NeedMore;
        for piece in body.chunks(chunk) {
            out = s.feed(piece);
            if out != ScanOutcome::NeedMore {
                break;
            }
        }
        (out, s)
    }

    /// Found by fuzzing (`multipart_model`): a field value longer than MAX_FIELD_BYTES was
    /// kept whole when its part arrived in one chunk, and skipped when it arrived in pieces.
    #[test]
    fn a_field_too_long_to_keep_is_skipped_however_the_body_is_cut() {
        for len in [
            MAX_FIELD_BYTES,
            MAX_FIELD_BYTES + 1,
            MAX_FIELD_BYTES + 5,
            4000,
        ] {
            let value = vec![b'u'; len];
            let body = form("XyZ-42", &[("user", &value), ("model", b"m")], "\r\n");
            for chunk in [1, 3, 64, 300, body.len()] {
                let (out, s) = user_field_scan(&body, chunk);
                assert_eq!(out, found("m"), "len {len} chunk {chunk}");
                let kept = s.field().map(str::len);
                let want = (len <= MAX_FIELD_BYTES).then_some(len);
                assert_eq!(kept, want, "len {len} chunk {chunk}");
            }
        }
    }
}
