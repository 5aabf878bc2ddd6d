//! A backend's answer (JSON or SSE) as any bytes, cut into any chunks: the usage read is the
//! same however the answer is cut, and the reader never panics.
#![no_main]
use jairouter_filter::usage::UsageScanner;
use jairouter_fuzz::{chunks, split_seed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (seed, body) = split_seed(data);
    let mut whole = UsageScanner::new();
    whole.feed(body);
    let mut cut = UsageScanner::new();
    for piece in chunks(body, seed) {
        cut.feed(piece);
    }
    let usage = whole.usage();
    assert_eq!(usage, cut.usage(), "chunking changed the usage");
    let _ = usage.charge(u64::MAX);
    // The estimate never exceeds one token per byte of text.
    assert!(usage.estimated_completion <= body.len() as u64);
});
