//! A long translated stream natively, for the per-token work of the stream translators: one
//! backend event per token, fed one event at a time as Envoy hands a stream's chunks on.
//! Run: cargo run --release -p jairouter-filter --example translate_stream -- PROTOCOL TOKENS
//! (PROTOCOL: claude, gemini, ollama or messages). Per token: count the instructions of two runs
//! with different TOKENS (`valgrind --tool=callgrind`) and divide the difference.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use jairouter_filter::config::Protocol;
use jairouter_filter::endpoint::Endpoint;
use jairouter_filter::translate::{translator, ReplyContext};

/// The backend's stream: its events, the first and the last of them framing `tokens` tokens.
fn events(protocol: &str, tokens: usize) -> Vec<String> {
    let mut events = Vec::new();
    match protocol {
        "claude" => {
            events.push("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n".to_string());
            events.push("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_string());
            for i in 0..tokens {
                events.push(format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" word{i}\"}}}}\n\n"));
            }
            events.push("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".to_string());
            events.push(format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{tokens}}}}}\n\n"));
            events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string());
        }
        "gemini" => {
            for i in 0..tokens {
                events.push(format!("data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\" word{i}\"}}],\"role\":\"model\"}},\"index\":0}}],\"usageMetadata\":{{\"promptTokenCount\":12,\"candidatesTokenCount\":{i}}},\"responseId\":\"r1\"}}\r\n\r\n"));
            }
            events.push(format!("data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"\"}}],\"role\":\"model\"}},\"finishReason\":\"STOP\",\"index\":0}}],\"usageMetadata\":{{\"promptTokenCount\":12,\"candidatesTokenCount\":{tokens}}},\"responseId\":\"r1\"}}\r\n\r\n"));
        }
        "ollama" => {
            for i in 0..tokens {
                events.push(format!("{{\"model\":\"llama3.2\",\"created_at\":\"2025-01-01T00:00:00Z\",\"message\":{{\"role\":\"assistant\",\"content\":\" word{i}\"}},\"done\":false}}\n"));
            }
            events.push(format!("{{\"model\":\"llama3.2\",\"created_at\":\"2025-01-01T00:00:00Z\",\"message\":{{\"role\":\"assistant\",\"content\":\"\"}},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":12,\"eval_count\":{tokens}}}\n"));
        }
        "messages" => {
            for i in 0..tokens {
                events.push(format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}]}}\n\n"));
            }
            events.push("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".to_string());
            events.push(format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{tokens}}}}}\n\n"));
            events.push("data: [DONE]\n\n".to_string());
        }
        other => panic!("unknown protocol {other} (claude, gemini, ollama, messages)"),
    }
    events
}

fn main() {
    let mut args = std::env::args().skip(1);
    let protocol = args.next().unwrap_or_else(|| "claude".into());
    let tokens: usize = args.next().map_or(1000, |n| n.parse().unwrap());
    let events = events(&protocol, tokens);
    let reply = ReplyContext {
        model: "m".into(),
        created: 1,
        include_usage: true,
        nonce: 0,
    };
    // The translator the exchange would pick for such a stream.
    let (endpoint, backend) = match protocol.as_str() {
        "claude" => (Endpoint::ChatCompletions, Protocol::Anthropic),
        "gemini" => (Endpoint::ChatCompletions, Protocol::Gemini),
        "ollama" => (Endpoint::ChatCompletions, Protocol::Ollama),
        _ => (Endpoint::Messages, Protocol::OpenAi),
    };
    let mut translator = translator(endpoint, backend).unwrap().stream(reply);
    let mut written = 0usize;
    for event in &events {
        let mut out = Vec::with_capacity(event.len() * 2);
        translator.feed(event.as_bytes(), &mut out).unwrap();
        written += out.len();
    }
    let mut out = Vec::new();
    translator.finish(&mut out).unwrap();
    written += out.len();
    println!("{protocol}: {tokens} tokens, {written} bytes out");
}
