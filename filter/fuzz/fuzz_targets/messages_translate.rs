//! The Anthropic Messages translator from hostile input. The first byte picks the function:
//! a request to translate, a backend answer, a backend stream (its second byte the chunking
//! seed; the output must be the same however the stream is cut), a request to count, an error
//! body, an error status. None may panic.
#![no_main]
use jairouter_filter::translate::messages_to_openai::{
    count_tokens, error_body, error_type, from_chat_response, openai_error_message,
    to_chat_request, MessageStream,
};
use jairouter_filter::translate::{parse_request, Malformed, ReplyContext, StreamTranslator};
use jairouter_fuzz::{chunks, split_seed};
use libfuzzer_sys::fuzz_target;

fn reply() -> ReplyContext {
    ReplyContext {
        model: "claude-sonnet-4-5".into(),
        created: 1_700_000_000,
        include_usage: false,
        nonce: 0,
    }
}

/// Feeds the pieces until one fails, then finishes; the output and whether it failed.
fn stream(pieces: &[&[u8]]) -> (Vec<u8>, Result<(), Malformed>) {
    let mut translator = MessageStream::new(reply());
    let mut out = Vec::new();
    for piece in pieces {
        if let Err(e) = translator.feed(piece, &mut out) {
            return (out, Err(e));
        }
    }
    let result = translator.finish(&mut out);
    (out, result)
}

fuzz_target!(|data: &[u8]| {
    let (which, rest) = split_seed(data);
    match which % 6 {
        0 => {
            if let Ok(request) = parse_request(rest) {
                if let Ok(chat) = to_chat_request(&request, "m") {
                    assert!(chat.get("messages").is_some_and(|m| m.is_array()));
                }
            }
        }
        1 => {
            if let Ok(message) = from_chat_response(rest, &reply()) {
                assert!(serde_json::from_slice::<serde_json::Value>(&message).is_ok());
            }
        }
        2 => {
            let (seed, body) = split_seed(rest);
            let whole = stream(&[body]);
            let cut = stream(&chunks(body, seed));
            assert_eq!(whole, cut, "chunking changed the translated stream");
        }
        3 => {
            if let Ok(request) = parse_request(rest) {
                let _ = count_tokens(&request);
            }
        }
        4 => {
            let _ = openai_error_message(rest);
        }
        _ => {
            let status = rest
                .iter()
                .take(4)
                .fold(0u32, |n, b| n.wrapping_shl(8) | u32::from(*b));
            let body = error_body(status, &String::from_utf8_lossy(rest));
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
            let _ = error_type(status);
        }
    }
});
