//! The Gemini adapter over any bytes. The first byte picks the function: the chat and embeddings
//! request translators (after parse_request), the answer, embeddings and error readers, or the
//! stream translator fed in chunks of every size (the second byte picks the cutting). None
//! panics, each answer is JSON, and the stream's translation is the same however it is cut.
#![no_main]
use jairouter_filter::translate::{openai_to_gemini, parse_request, ReplyContext};
use jairouter_fuzz::{check_stream, split_seed};
use libfuzzer_sys::fuzz_target;

fn reply(include_usage: bool) -> ReplyContext {
    ReplyContext {
        model: "gemini-2.5-flash".into(),
        created: 1,
        include_usage,
        nonce: 0,
    }
}

fn is_json(out: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(out).is_ok_and(|v| v.is_object())
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (seed, body) = split_seed(rest);
    match which % 6 {
        0 => {
            if let Ok(request) = parse_request(body) {
                if let Ok(out) = openai_to_gemini::chat_request(&request) {
                    assert!(out.is_object());
                }
            }
        }
        1 => {
            if let Ok(request) = parse_request(body) {
                if let Ok(out) = openai_to_gemini::embed_request(&request, "gemini-embedding-001") {
                    assert!(out.is_object());
                }
            }
        }
        2 => {
            if let Ok(out) = openai_to_gemini::chat_response(body, &reply(false)) {
                assert!(is_json(&out));
            }
        }
        3 => {
            if let Ok(out) = openai_to_gemini::embed_response(body, &reply(false)) {
                assert!(is_json(&out));
            }
        }
        4 => {
            let _ = openai_to_gemini::error_message(body);
        }
        _ => check_stream(|| openai_to_gemini::ChatStream::new(reply(seed & 1 == 1)), body, seed),
    }
});
