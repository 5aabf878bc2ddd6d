//! The rate-limit service's answer over any bytes: reading it never panics, never reads more
//! statuses than its bound, and what it reads survives a round trip through the encoder (so
//! the decoder keeps nothing the encoder cannot say). The request encoders are fed the fuzzer's
//! strings and numbers too: their output must read back as well-formed protobuf.
#![no_main]
use jairouter_filter::limit::rls::{
    decode_answer, encode_answer, encode_request, encode_settle, Descriptor, RlsUnit, Settlement,
    MAX_STATUSES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(answer) = decode_answer(data) {
        assert!(answer.statuses.len() <= MAX_STATUSES);
        assert_eq!(decode_answer(&encode_answer(&answer)), Ok(answer));
    }
    let text = String::from_utf8_lossy(data);
    let mid = (0..=text.len() / 2)
        .rev()
        .find(|at| text.is_char_boundary(*at))
        .unwrap_or(0);
    let (name, bucket) = text.split_at(mid);
    let number = data.iter().fold(0u64, |n, b| n.rotate_left(8) ^ u64::from(*b));
    let descriptor = Descriptor {
        limit_name: name.to_string(),
        bucket: bucket.to_string(),
        per_unit: number as u32,
        unit: RlsUnit::ALL[(number % 4) as usize],
        hits: number,
    };
    let request = encode_request(name, [&descriptor]);
    // A request is no answer, but it is well-formed protobuf: the reader gets through it.
    let _ = decode_answer(&request);
    let settle = encode_settle(bucket, &[Settlement { descriptor, delta: number as i64 }]);
    let _ = decode_answer(&settle);
});
