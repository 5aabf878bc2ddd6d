//! The JSON model scanner over any bytes, cut into any chunks: it never panics, never keeps
//! more than its bounds, and (without extra fields) answers the same however the body is cut.
#![no_main]
use jairouter_filter::scan::json::JsonModelScanner;
use jairouter_filter::scan::ScanOutcome;
use jairouter_fuzz::{chunks, split_seed};
use libfuzzer_sys::fuzz_target;

const MAX_MODEL: usize = 64;

fn run(mut scanner: JsonModelScanner, pieces: &[&[u8]]) -> (ScanOutcome, JsonModelScanner) {
    for piece in pieces {
        let out = scanner.feed(piece);
        if out != ScanOutcome::NeedMore {
            // Once decided, the answer never changes.
            assert_eq!(scanner.feed(b"}garbage"), out);
            assert_eq!(scanner.finish(), out);
            return (out, scanner);
        }
    }
    let out = scanner.finish();
    assert_ne!(out, ScanOutcome::NeedMore);
    (out, scanner)
}

fuzz_target!(|data: &[u8]| {
    let (seed, body) = split_seed(data);
    let (whole, _) = run(JsonModelScanner::new(MAX_MODEL), &[body]);
    let (cut, _) = run(JsonModelScanner::new(MAX_MODEL), &chunks(body, seed));
    assert_eq!(whole, cut, "chunking changed the answer");
    if let ScanOutcome::Found(model) = &whole {
        assert!(model.len() <= MAX_MODEL && !model.trim().is_empty());
    }
    // When the whole body is JSON serde_json accepts, a top-level string `model` is what the
    // scanner finds (the first one: serde_json keeps the last, so only bodies with one).
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(serde_json::Value::String(m)) = map.get("model") {
            let once = !body
                .windows(7)
                .filter(|w| *w == b"\"model\"")
                .nth(1)
                .is_some()
                && !body.contains(&b'\\');
            if once && m.len() <= MAX_MODEL && !m.trim().is_empty() {
                assert_eq!(whole, ScanOutcome::Found(m.clone()));
            }
        }
    }
    // With extra fields the answer may depend on where the lookahead ends, but never panics,
    // and a model found is the same model.
    let with = JsonModelScanner::new(MAX_MODEL)
        .with_field("user")
        .with_field("max_tokens");
    let (fields, scanner) = run(with, &chunks(body, seed.wrapping_add(1)));
    if let (ScanOutcome::Found(a), ScanOutcome::Found(b)) = (&fields, &whole) {
        assert_eq!(a, b);
    }
    for name in ["user", "max_tokens"] {
        if let Some(v) = scanner.field(name) {
            assert!(v.len() <= 1024, "field value of {} bytes kept", v.len());
        }
    }
    if let Some((start, end)) = scanner.model_span() {
        assert!(start < end && end <= body.len());
    }
});
