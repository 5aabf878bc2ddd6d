//! The multipart model scanner: input is a chunking seed, a Content-Type line, then the body.
#![no_main]
use jairouter_filter::scan::multipart::{boundary_from_content_type, MultipartModelScanner};
use jairouter_filter::scan::ScanOutcome;
use jairouter_fuzz::{chunks, split_line, split_seed};
use libfuzzer_sys::fuzz_target;

const MAX_MODEL: usize = 64;
const MAX_HEADERS: usize = 512;

fn run(mut scanner: MultipartModelScanner, pieces: &[&[u8]]) -> (ScanOutcome, Option<String>) {
    for piece in pieces {
        let out = scanner.feed(piece);
        if out != ScanOutcome::NeedMore {
            assert_eq!(scanner.feed(b"\r\n--x--\r\n"), out);
            assert_eq!(scanner.finish(), out);
            return (out, scanner.field().map(str::to_string));
        }
    }
    let out = scanner.finish();
    assert_ne!(out, ScanOutcome::NeedMore);
    (out, scanner.field().map(str::to_string))
}

fuzz_target!(|data: &[u8]| {
    let (seed, rest) = split_seed(data);
    let (content_type, body) = split_line(rest);
    let content_type = String::from_utf8_lossy(content_type);
    let boundary = match boundary_from_content_type(&content_type) {
        Some(b) => {
            assert!((1..=70).contains(&b.len()));
            b
        }
        None => "XyZ".to_string(),
    };
    let new = || MultipartModelScanner::new(&boundary, MAX_MODEL, MAX_HEADERS);
    let (whole, _) = run(new(), &[body]);
    let (cut, _) = run(new(), &chunks(body, seed));
    // The preamble bound is checked per chunk, so only bodies within it must agree exactly.
    if body.len() < 64 * 1024 {
        assert_eq!(whole, cut, "chunking changed the answer");
    }
    if let ScanOutcome::Found(model) = &whole {
        assert!(model.len() <= MAX_MODEL && !model.trim().is_empty());
    }
    let (fields_whole, field_whole) = run(new().with_field("user"), &[body]);
    let (fields_cut, field_cut) = run(new().with_field("user"), &chunks(body, seed));
    assert_eq!(
        fields_whole, fields_cut,
        "chunking changed the answer (with a field)"
    );
    assert_eq!(field_whole, field_cut, "chunking changed the field");
    if let Some(v) = &field_whole {
        assert!(v.len() <= 256 * 3, "field value of {} bytes kept", v.len());
    }
});
