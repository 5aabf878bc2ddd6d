//! Property tests of the parsers that read what clients and backends send, and of the rate-limit
//! algorithms (issue 10). Native only: proptest needs a clock and entropy wasm32 lacks.
#![cfg(not(target_arch = "wasm32"))]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use jairouter_filter::config::Algorithm;
use jairouter_filter::limit::bucket::{admit, Params};
use jairouter_filter::scan::json::JsonModelScanner;
use jairouter_filter::scan::ScanOutcome;
use jairouter_filter::usage::{Usage, UsageScanner};
use proptest::prelude::*;
use serde_json::{Map, Value};

const MAX_MODEL: usize = 1024;

/// Cuts `bytes` at the given points (taken modulo its length, in any order).
fn cut<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = points
        .iter()
        .map(|p| if bytes.is_empty() { 0 } else { p % bytes.len() })
        .collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

// ---------------------------------------------------------------------------------------------
// The JSON model scanner against serde_json.

/// Text with what makes JSON strings hard: quotes, backslashes, controls, non-ASCII, astral
/// characters, and the word `model`.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::char::range('a', 'z'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just('\n'),
            1 => Just('\u{1}'),
            1 => Just('é'),
            1 => Just('日'),
            1 => Just('\u{1F600}'),
            1 => Just('\u{FEFF}'),
        ],
        0..12,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => text(),
        1 => Just("model".to_string()),
        1 => Just("models".to_string()),
        1 => Just("mode".to_string()),
        1 => Just("user".to_string()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Floats whose decimal form reads back exactly (serde_json's default float parsing
        // is not exact for every long mantissa, which is not what is tested here).
        any::<i32>().prop_map(|i| Value::from(f64::from(i) / 1024.0)),
        prop::sample::select(vec![1.5e300, -2.5e-300, 0.0, 1e21]).prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A top-level object, with or without a `model`, which may be any value.
fn body() -> impl Strategy<Value = Map<String, Value>> {
    let model = prop_oneof![
        4 => text().prop_map(Value::String),
        1 => "[a-z0-9:._/-]{1,40}".prop_map(Value::String),
        1 => json_value(),
    ];
    (
        prop::collection::vec((key(), json_value()), 0..6),
        prop::option::of(model),
        0usize..7,
    )
        .prop_map(|(pairs, model, at)| {
            let mut pairs: Vec<(String, Value)> =
                pairs.into_iter().filter(|(k, _)| k != "model").collect();
            if let Some(model) = model {
                pairs.insert(at.min(pairs.len()), ("model".to_string(), model));
            }
            pairs.into_iter().collect()
        })
}

/// Writes JSON the way different clients do: with or without whitespace, escaping non-ASCII
/// (`\uXXXX`, surrogate pairs for astral characters) or not.
fn write_json(value: &Value, ascii: bool, spaced: bool, out: &mut String) {
    let ws = |out: &mut String| {
        if spaced {
            out.push_str(" \n\t");
        }
    };
    match value {
        Value::Object(map) => {
            out.push('{');
            for (n, (k, v)) in map.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                ws(out);
                write_string(k, ascii, out);
                ws(out);
                out.push(':');
                ws(out);
                write_json(v, ascii, spaced, out);
                ws(out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (n, v) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                ws(out);
                write_json(v, ascii, spaced, out);
            }
            ws(out);
            out.push(']');
        }
        Value::String(s) => write_string(s, ascii, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn scan(pieces: &[&[u8]]) -> (ScanOutcome, Option<(usize, usize)>) {
    let mut scanner = JsonModelScanner::new(MAX_MODEL);
    for piece in pieces {
        let out = scanner.feed(piece);
        if out != ScanOutcome::NeedMore {
            return (out, scanner.model_span());
        }
    }
    (scanner.finish(), scanner.model_span())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the JSON and however it is cut, the scanner finds the `model` serde_json reads,
    /// refuses a `model` that is not a non-empty string, and says `Absent` when there is none;
    /// the span it reports decodes to the model.
    #[test]
    fn the_json_scanner_finds_what_serde_json_reads_for_any_chunking(
        map in body(),
        ascii in any::<bool>(),
        spaced in any::<bool>(),
        bom in any::<bool>(),
        points in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut text = String::new();
        if bom {
            text.push('\u{FEFF}');
        }
        write_json(&Value::Object(map.clone()), ascii, spaced, &mut text);
        let parsed: Value = serde_json::from_str(text.trim_start_matches('\u{FEFF}')).unwrap();
        // What serde_json reads (floats aside, which its default parser rounds differently).
        let read_model = parsed.get("model").and_then(Value::as_str);
        prop_assert_eq!(read_model, map.get("model").and_then(Value::as_str));
        let bytes = text.as_bytes();
        let (outcome, span) = scan(&cut(bytes, &points));
        let (whole, _) = scan(&[bytes]);
        prop_assert_eq!(&outcome, &whole);
        match map.get("model") {
            None => prop_assert_eq!(outcome, ScanOutcome::Absent),
            Some(Value::String(m)) if !m.trim().is_empty() && m.len() <= MAX_MODEL => {
                prop_assert_eq!(&outcome, &ScanOutcome::Found(m.clone()));
                let (start, end) = span.unwrap();
                let written: Value = serde_json::from_slice(&bytes[start..end]).unwrap();
                prop_assert_eq!(written, Value::String(m.clone()));
            }
            Some(_) => prop_assert!(matches!(outcome, ScanOutcome::Invalid(_)), "{:?}", outcome),
        }
    }

    /// Any bytes at all, cut anywhere: the same answer as in one piece, and never a panic.
    #[test]
    fn the_json_scanner_answers_the_same_for_any_bytes_and_any_chunking(
        bytes in prop::collection::vec(
            prop_oneof![
                any::<u8>(),
                prop::sample::select(b"{}[]\":,\\ u0123456789.eE+-truefalsnmodel".to_vec()),
            ],
            0..200,
        ),
        points in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (cut_outcome, _) = scan(&cut(&bytes, &points));
        let (whole, _) = scan(&[&bytes]);
        prop_assert_eq!(cut_outcome, whole);
    }
}

// ---------------------------------------------------------------------------------------------
// The usage reader over SSE and JSON answers.

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF
        | 0x20000..=0x2FFFF)
}

#[derive(Debug, Clone)]
enum Event {
    Delta(String),
    Comment(String),
    Usage(u64, u64),
    Named(String),
}

fn event() -> impl Strategy<Value = Event> {
    let content = prop::collection::vec(
        prop_oneof![
            4 => prop::char::range('a', 'z'),
            2 => prop::char::range('\u{4E00}', '\u{4E20}'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just('\n'),
            1 => Just('é'),
            1 => Just('\u{1F600}'),
        ],
        0..16,
    )
    .prop_map(|c| c.into_iter().collect::<String>());
    prop_oneof![
        6 => content.prop_map(Event::Delta),
        1 => "[a-z :]{0,20}".prop_map(Event::Comment),
        1 => (0u64..1_000_000, 0u64..1_000_000).prop_map(|(p, c)| Event::Usage(p, c)),
        1 => "[a-z]{1,10}".prop_map(Event::Named),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// However a stream is cut (CRLF or LF, comments, named events, with or without `[DONE]`),
    /// the usage read is the same; a reported usage is read exactly (the last one wins), and the
    /// estimate counts the text the deltas carried.
    #[test]
    fn chunking_never_changes_an_sse_usage_parse(
        events in prop::collection::vec(event(), 0..20),
        crlf in any::<bool>(),
        done in any::<bool>(),
        points in prop::collection::vec(any::<usize>(), 0..30),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut stream = String::new();
        let (mut cjk, mut other, mut reported) = (0u64, 0u64, None);
        for e in &events {
            match e {
                Event::Delta(text) => {
                    let chunk = serde_json::json!({"id": "c", "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": text}}]});
                    stream.push_str(&format!("data: {chunk}{eol}{eol}"));
                    for c in text.chars() {
                        if is_cjk(c) { cjk += 1 } else { other += 1 }
                    }
                }
                Event::Comment(text) => stream.push_str(&format!(":{text}{eol}")),
                Event::Named(name) => stream.push_str(&format!("event: {name}{eol}id: 7{eol}")),
                Event::Usage(p, c) => {
                    stream.push_str(&format!(
                        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\
                         \"completion_tokens\":{c},\"total_tokens\":{}}}}}{eol}{eol}", p + c));
                    reported = Some((*p, *c));
                }
            }
        }
        if done {
            stream.push_str(&format!("data: [DONE]{eol}{eol}"));
        }
        let bytes = stream.as_bytes();
        let mut whole = UsageScanner::new();
        whole.feed(bytes);
        let mut pieces = UsageScanner::new();
        for piece in cut(bytes, &points) {
            pieces.feed(piece);
        }
        let usage = whole.usage();
        prop_assert_eq!(usage, pieces.usage());
        prop_assert_eq!(usage.estimated_completion, cjk.div_ceil(2) + other.div_ceil(4));
        prop_assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (reported.map(|r| r.0), reported.map(|r| r.1))
        );
    }

    /// Any bytes from a backend, cut anywhere: the same usage, never a panic.
    #[test]
    fn chunking_never_changes_the_usage_of_any_bytes(
        bytes in prop::collection::vec(
            prop_oneof![
                any::<u8>(),
                prop::sample::select(b"{}\":,\\ u0123456789dat:[]".to_vec()),
            ],
            0..300,
        ),
        points in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut whole = UsageScanner::new();
        whole.feed(&bytes);
        let mut pieces = UsageScanner::new();
        for piece in cut(&bytes, &points) {
            pieces.feed(piece);
        }
        prop_assert_eq!(whole.usage(), pieces.usage());
        let _: Usage = whole.usage();
    }
}

// ---------------------------------------------------------------------------------------------
// Rate-limit buckets.

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::TokenBucket),
        Just(Algorithm::LeakyBucket),
        Just(Algorithm::SlidingWindow),
        Just(Algorithm::WarmUp),
    ]
}

fn params() -> impl Strategy<Value = Params> {
    prop_oneof![
        3 => (algorithm(), 1u64..500, 1u64..500, 1u64..5, 1u64..20, 1u64..10).prop_map(
            |(algorithm, capacity, rate, window, warm_up, cold)| {
                let window = if algorithm == Algorithm::SlidingWindow {
                    window.min(10_000 / rate).max(1)
                } else {
                    window
                };
                Params {
                    algorithm,
                    capacity,
                    rate,
                    period_secs: 1,
                    window_ns: window * 1_000_000_000,
                    warm_up_ns: warm_up * 1_000_000_000,
                    cold_factor: cold,
                }
            }
        ),
        // Token budgets and API-key quotas: an amount a minute or a day.
        1 => (1u64..100_000, prop::sample::select(vec![60u64, 86_400]))
            .prop_map(|(amount, period)| Params::per_period(amount, period)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// From a fresh bucket, requests at any (non-decreasing) times are never admitted more than
    /// the bucket's limit plus what the elapsed time refills.
    #[test]
    fn a_bucket_never_admits_more_than_capacity_plus_elapsed_times_rate(
        p in params(),
        start in 1u64..(1 << 60),
        gaps in prop::collection::vec(
            prop_oneof![Just(0u64), 0u64..1_000_000, 0u64..3_000_000_000],
            1..400,
        ),
    ) {
        let mut state: Option<Vec<u8>> = None;
        let mut now = start;
        let mut admitted: u128 = 0;
        for gap in gaps {
            now += gap;
            let (written, verdict) = admit(&p, state.as_deref(), now);
            if verdict.admitted {
                admitted += 1;
            }
            if let Some(w) = written {
                state = Some(w);
            }
            let elapsed = u128::from(now - start);
            let refill = elapsed * u128::from(p.rate) / 1_000_000_000 / u128::from(p.period_secs);
            // +1: warm-up integrates its ramp in floating point.
            let bound = u128::from(p.limit()) + refill + 1;
            prop_assert!(admitted <= bound, "{admitted} admitted, bound {bound}, {p:?}");
        }
    }
}
