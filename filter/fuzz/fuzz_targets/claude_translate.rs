//! The Anthropic adapter over any bytes: as an OpenAI request, as a Message, as an error body and
//! as an event stream cut into any chunks. It never panics, a request it translates has
//! alternating turns, and a stream translates the same however it is cut.
#![no_main]
use jairouter_filter::translate::openai_to_claude::{self, ChatStream};
use jairouter_filter::translate::{parse_request, Malformed, ReplyContext, StreamTranslator};
use jairouter_fuzz::{chunks, split_seed};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn stream(pieces: &[&[u8]], reply: &ReplyContext) -> (Result<(), Malformed>, Vec<u8>) {
    let mut translator = ChatStream::new(reply.clone());
    let mut out = Vec::new();
    for piece in pieces {
        if let Err(e) = translator.feed(piece, &mut out) {
            return (Err(e), out);
        }
    }
    let result = translator.finish(&mut out);
    (result, out)
}

fuzz_target!(|data: &[u8]| {
    // The first byte: how the stream is cut, and (its low bit) whether usage is asked for.
    let (mode, body) = split_seed(data);
    let reply = ReplyContext {
        model: "m".into(),
        created: 1,
        include_usage: mode & 1 == 1,
        nonce: 0,
    };

    if let Ok(request) = parse_request(body) {
        if let Ok(Value::Object(out)) = openai_to_claude::chat_request(&request, "claude") {
            assert_eq!(out.get("model"), Some(&Value::from("claude")));
            assert!(out.get("max_tokens").and_then(Value::as_u64).unwrap_or(0) > 0);
            let turns = out.get("messages").and_then(Value::as_array).unwrap();
            assert!(!turns.is_empty());
            let roles: Vec<&str> = turns.iter().map(|t| t["role"].as_str().unwrap()).collect();
            assert!(roles.windows(2).all(|w| w[0] != w[1]), "turns do not alternate: {roles:?}");
        }
    }

    if let Ok(answer) = openai_to_claude::chat_response(body, &reply) {
        assert!(serde_json::from_slice::<Value>(&answer).unwrap().is_object());
    }
    let _ = openai_to_claude::error_message(body);

    let (whole, whole_out) = stream(&[body], &reply);
    let (cut, cut_out) = stream(&chunks(body, mode), &reply);
    assert_eq!(whole.is_ok(), cut.is_ok(), "chunking changed the outcome");
    assert_eq!(whole_out, cut_out, "chunking changed the output");
    if whole.is_ok() {
        assert!(whole_out.ends_with(b"data: [DONE]\n\n"));
    }
    // Every event written is `data: ` and JSON or [DONE].
    for event in whole_out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let data = event.strip_prefix(b"data: ").unwrap();
        assert!(data == b"[DONE]" || serde_json::from_slice::<Value>(data).is_ok());
    }
});
