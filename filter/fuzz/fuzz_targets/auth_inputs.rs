//! What API-key authentication reads from outside: JWT claims as Envoy hands them, Base64,
//! timestamps, and the api-key section of the configuration.
#![no_main]
use jairouter_filter::auth::{claim_values, ApiKeys};
use jairouter_filter::encoding::{base64_decode, base64_encode, parse_time};
use jairouter_fuzz::split_seed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mode, rest) = split_seed(data);
    let text = String::from_utf8_lossy(rest);
    match mode % 4 {
        0 => {
            for value in claim_values(rest) {
                assert!(value.len() <= rest.len());
            }
        }
        1 => {
            if let Some(bytes) = base64_decode(&text) {
                assert!(bytes.len() <= text.len());
                // Decoding what we encode gives the bytes back.
                assert_eq!(
                    base64_decode(&base64_encode(&bytes)).as_deref(),
                    Some(&bytes[..])
                );
            }
            assert_eq!(base64_decode(&base64_encode(rest)).as_deref(), Some(rest));
        }
        2 => {
            let _ = parse_time(&text);
        }
        _ => {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = ApiKeys::parse("jairouter.security.api-key", &value);
            }
        }
    }
});
