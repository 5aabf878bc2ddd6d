//! Helpers shared by the fuzz targets: how an input is cut into the chunks Envoy would hand the
//! filter.

/// Splits `data` into chunks whose sizes follow `seed`: 0 feeds one byte at a time, 255 feeds
/// everything at once, anything else cycles through sizes derived from it (1 to 64 bytes), so
/// every state of a scanner meets a chunk boundary somewhere in the corpus.
pub fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    match seed {
        0 => data.chunks(1).collect(),
        255 => vec![data],
        _ => {
            let mut out = Vec::new();
            let mut rest = data;
            let mut state = u32::from(seed);
            while !rest.is_empty() {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let size = ((state >> 16) % 64 + 1) as usize;
                let (head, tail) = rest.split_at(size.min(rest.len()));
                out.push(head);
                rest = tail;
            }
            out
        }
    }
}

/// The first byte (the chunking seed) and the rest.
pub fn split_seed(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((seed, rest)) => (*seed, rest),
        None => (255, &[]),
    }
}

/// The input up to the first `\n` and what follows it.
pub fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

use jairouter_filter::translate::{Malformed, StreamTranslator};

/// Feeds a stream translator `pieces` and finishes it: all it wrote, or its error.
pub fn translate_stream<T: StreamTranslator>(
    mut translator: T,
    pieces: &[&[u8]],
) -> Result<Vec<u8>, Malformed> {
    let mut out = Vec::new();
    for piece in pieces {
        translator.feed(piece, &mut out)?;
    }
    translator.finish(&mut out)?;
    Ok(out)
}

/// Checks a translated stream whole and cut by `seed`: the same output however it is cut, and
/// that output OpenAI's SSE (`data: <JSON object>` events, `data: [DONE]` last).
pub fn check_stream<T: StreamTranslator>(new: impl Fn() -> T, body: &[u8], seed: u8) {
    let whole = translate_stream(new(), &[body]);
    let cut = translate_stream(new(), &chunks(body, seed));
    assert_eq!(whole, cut, "chunking changed the translation");
    let Ok(out) = whole else { return };
    let text = std::str::from_utf8(&out).expect("the translation is UTF-8");
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "an unterminated event"
    );
    for (i, event) in events.iter().enumerate() {
        let data = event
            .strip_prefix("data: ")
            .expect("every event is one data line");
        if data == "[DONE]" {
            assert_eq!(i + 1, events.len(), "[DONE] is the last event");
        } else {
            let value: serde_json::Value = serde_json::from_str(data).expect("each event is JSON");
            assert!(value.is_object(), "each event is a JSON object");
        }
    }
    assert_eq!(
        events.last(),
        Some(&"data: [DONE]"),
        "a finished stream ends with [DONE]"
    );
}
