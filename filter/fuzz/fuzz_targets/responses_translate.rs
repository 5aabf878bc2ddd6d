//! The Responses API translator from hostile input, through its `Translator` (as the exchange
//! drives it). The first byte picks the function: a request to translate, a backend answer, a
//! backend stream (its second byte the chunking seed; the output must be the same however the
//! stream is cut), an error body. None may panic.
#![no_main]
use jairouter_filter::endpoint::Endpoint;
use jairouter_filter::translate::responses_to_openai::ResponsesToOpenAi;
use jairouter_filter::translate::{parse_request, Malformed, ReplyContext, Translator};
use jairouter_fuzz::{chunks, split_seed};
use libfuzzer_sys::fuzz_target;

const TRANSLATOR: &dyn Translator = &ResponsesToOpenAi;
// The translator treats every call as a Responses request, whatever the endpoint.
const ENDPOINT: Endpoint = Endpoint::ChatCompletions;

fn reply() -> ReplyContext {
    ReplyContext {
        model: "gpt-4.1".into(),
        created: 1_700_000_000,
        include_usage: false,
        nonce: 0x1234,
    }
}

/// Feeds the pieces until one fails, then finishes; the output and whether it failed.
fn stream(pieces: &[&[u8]]) -> (Vec<u8>, Result<(), Malformed>) {
    let mut translator = TRANSLATOR.stream(reply());
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
    match which % 4 {
        0 => {
            if let Ok(request) = parse_request(rest) {
                if let Ok(chat) = TRANSLATOR.request(ENDPOINT, &request, "m") {
                    assert!(chat
                        .get("messages")
                        .and_then(|m| m.as_array())
                        .is_some_and(|m| !m.is_empty()));
                    assert_eq!(chat.get("model").and_then(|m| m.as_str()), Some("m"));
                }
            }
        }
        1 => {
            if let Ok(response) = TRANSLATOR.answer(ENDPOINT, rest, &reply()) {
                let response: serde_json::Value = serde_json::from_slice(&response).unwrap();
                assert_eq!(response["object"], "response");
                assert_eq!(response["id"], "resp_0000000000001234");
                assert!(response["output"].is_array());
            }
        }
        2 => {
            let (seed, body) = split_seed(rest);
            let whole = stream(&[body]);
            let cut = stream(&chunks(body, seed));
            assert_eq!(whole, cut, "chunking changed the translated stream");
        }
        _ => {
            let _ = TRANSLATOR.error_message(rest);
        }
    }
});
