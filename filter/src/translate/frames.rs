//! Framing of streamed answers: lines (Ollama's NDJSON) and server-sent events (Anthropic's and
//! Gemini's streams), fed chunk by chunk with the partial line carried over. Bounded: a line
//! longer than the limit is malformed output, not a reason to grow without end.

use super::Malformed;

/// The longest line (one event's `data:` or one NDJSON object) a stream may carry.
pub const MAX_LINE: usize = 1 << 20;

/// Splits a byte stream into lines (LF or CRLF), keeping only the unfinished one.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    pub fn new() -> Lines {
        Lines::default()
    }

    /// Calls `each` with every line the chunk completes (without its line ending).
    pub fn feed(
        &mut self,
        chunk: &[u8],
        each: &mut dyn FnMut(&[u8]) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        let mut rest = chunk;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(at);
            rest = after.get(1..).unwrap_or_default();
            if self.partial.is_empty() {
                // The same bound whether the line came in one chunk or several.
                if line.len() > MAX_LINE {
                    return Err(Malformed::new(
                        "the backend's stream has a line longer than 1 MiB",
                    ));
                }
                each(trim_cr(line))?;
            } else {
                self.grow(line)?;
                let whole = std::mem::take(&mut self.partial);
                each(trim_cr(&whole))?;
            }
        }
        self.grow(rest)
    }

    /// The last line, if the stream ended without a line ending.
    pub fn finish(
        &mut self,
        each: &mut dyn FnMut(&[u8]) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let whole = std::mem::take(&mut self.partial);
        each(trim_cr(&whole))
    }

    fn grow(&mut self, bytes: &[u8]) -> Result<(), Malformed> {
        if self.partial.len().saturating_add(bytes.len()) > MAX_LINE {
            self.partial.clear();
            return Err(Malformed::new(
                "the backend's stream has a line longer than 1 MiB",
            ));
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// One server-sent event: its `event:` name (empty when none) and its `data:` lines joined.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: Vec<u8>,
}

/// Server-sent events, dispatched at each blank line (comments and `id:`/`retry:` ignored).
#[derive(Debug, Default)]
pub struct SseEvents {
    lines: Lines,
    event: Event,
    has_data: bool,
}

impl SseEvents {
    pub fn new() -> SseEvents {
        SseEvents::default()
    }

    pub fn feed(
        &mut self,
        chunk: &[u8],
        each: &mut dyn FnMut(&Event) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        let Self {
            lines,
            event,
            has_data,
        } = self;
        lines.feed(chunk, &mut |line| on_line(line, event, has_data, each))
    }

    /// Dispatches an event the stream ended without a blank line after.
    pub fn finish(
        &mut self,
        each: &mut dyn FnMut(&Event) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        let Self {
            lines,
            event,
            has_data,
        } = self;
        lines.finish(&mut |line| on_line(line, event, has_data, each))?;
        on_line(b"", event, has_data, each)
    }
}

fn on_line(
    line: &[u8],
    event: &mut Event,
    has_data: &mut bool,
    each: &mut dyn FnMut(&Event) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    if line.is_empty() {
        if *has_data || !event.name.is_empty() {
            let result = each(event);
            *event = Event::default();
            *has_data = false;
            return result;
        }
        return Ok(());
    }
    if line.first() == Some(&b':') {
        return Ok(());
    }
    let (field, value) = match line.iter().position(|&b| b == b':') {
        Some(at) => {
            let (field, value) = line.split_at(at);
            let value = value.get(1..).unwrap_or_default();
            (field, value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &b""[..]),
    };
    match field {
        b"event" => event.name = String::from_utf8_lossy(value).into_owned(),
        b"data" => {
            if *has_data {
                event.data.push(b'\n');
            }
            if event.data.len().saturating_add(value.len()) > MAX_LINE {
                return Err(Malformed::new(
                    "the backend's stream has an event longer than 1 MiB",
                ));
            }
            event.data.extend_from_slice(value);
            *has_data = true;
        }
        _ => {}
    }
    Ok(())
}

/// Test support for the stream translators: the output (or the error) of `stream` fed whole,
/// which must be the same cut at every offset and fed a byte at a time.
#[cfg(test)]
pub fn same_under_any_chunking<T: super::StreamTranslator>(
    new: impl Fn() -> T,
    stream: &[u8],
) -> Result<Vec<u8>, Malformed> {
    let run = |pieces: &[&[u8]]| {
        let mut translator = new();
        let mut out = Vec::new();
        for piece in pieces {
            translator.feed(piece, &mut out)?;
        }
        translator.finish(&mut out).map(|()| out)
    };
    let whole = run(&[stream]);
    for split in 0..=stream.len() {
        let (a, b) = stream.split_at(split);
        assert_eq!(run(&[a, b]), whole, "cut at byte {split}");
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run(&bytes), whole, "fed a byte at a time");
    whole
}

/// Test support: the `data:` payloads of an OpenAI stream, JSON parsed (`[DONE]` as a string).
#[cfg(test)]
pub fn sse_payloads(out: &[u8]) -> Vec<serde_json::Value> {
    let text = std::str::from_utf8(out).unwrap();
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "unterminated event: {text}"
    );
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let data = event.strip_prefix("data: ").unwrap();
            serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::from(data))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn events_of(chunks: &[&[u8]]) -> Vec<Event> {
        let mut sse = SseEvents::new();
        let mut seen = Vec::new();
        for chunk in chunks {
            sse.feed(chunk, &mut |e| {
                seen.push(e.clone());
                Ok(())
            })
            .unwrap();
        }
        sse.finish(&mut |e| {
            seen.push(e.clone());
            Ok(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn events_are_the_same_under_any_chunking() {
        let stream = b"event: message_start\ndata: {\"a\":1}\n\n: ping\r\nevent: ping\ndata: {}\r\n\r\ndata: x\ndata: y\n\n";
        let whole = events_of(&[stream]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0].name, "message_start");
        assert_eq!(whole[0].data, b"{\"a\":1}");
        assert_eq!(whole[2].data, b"x\ny");
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(events_of(&[a, b]), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events_of(&bytes), whole);
    }

    #[test]
    fn an_event_the_stream_ends_on_is_dispatched() {
        let seen = events_of(&[b"data: last"]);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].data, b"last");
    }

    #[test]
    fn lines_split_on_lf_and_crlf_and_are_bounded() {
        let mut lines = Lines::new();
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let mut push = |l: &[u8]| {
            seen.push(l.to_vec());
            Ok(())
        };
        lines.feed(b"{\"a\"", &mut push).unwrap();
        lines.feed(b":1}\r\n{\"b\":2}\n{\"c\"", &mut push).unwrap();
        lines.finish(&mut push).unwrap();
        assert_eq!(
            seen,
            vec![
                b"{\"a\":1}".to_vec(),
                b"{\"b\":2}".to_vec(),
                b"{\"c\"".to_vec()
            ]
        );
        let mut long = Lines::new();
        let big = vec![b'x'; MAX_LINE + 1];
        assert!(long.feed(&big, &mut |_| Ok(())).is_err());
    }
}
