//! Translation between the OpenAI API, which clients speak, and the protocols of the backends an
//! `adapter:` names (Anthropic Messages, Gemini, native Ollama). Pure: bytes and JSON in, bytes
//! out, no host calls. The exchange feeds it from its body callbacks: a request is translated
//! whole (it is buffered anyway, bounded by `gateway.max-body-bytes`), an answer whole when it is
//! not streamed, and a stream chunk by chunk, with partial events carried over and never held.
//!
//! Each protocol has a module with the same shape: `chat_request` (an OpenAI chat request, as
//! JSON, to the vendor's body), `chat_response` (the vendor's answer to an OpenAI
//! `chat.completion`), `ChatStream` (the vendor's stream to OpenAI chunks), `error_message` (the
//! message of a vendor error body), and for the protocols with embeddings `embed_request` /
//! `embed_response`.
//!
//! `messages` is the other way round: a client speaking Anthropic Messages (Claude Code, the
//! Anthropic SDKs) in front of an OpenAI-compatible backend.

pub mod claude;
pub mod frames;
pub mod gemini;
pub mod messages;
pub mod ollama;
pub mod openai;

use serde_json::Value;

/// A request the adapter cannot express for its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not what the OpenAI API accepts (a 400).
    Invalid(String),
    /// Valid, but the backend's protocol has no way to say it (a 501).
    Unsupported(String),
}

/// Backend output that is not what its protocol promises (a 502 for the client). The message is
/// safe to show a client: it names what was wrong, never echoes the backend's bytes at length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl Malformed {
    pub fn new(why: impl Into<String>) -> Malformed {
        Malformed(why.into())
    }
}

/// What the translation of an answer needs to know of its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyContext {
    /// The model the answer is labelled with (the one the client asked for, or its fallback).
    pub model: String,
    /// Unix seconds, for the OpenAI `created` field.
    pub created: u64,
    /// The client asked for a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// A streamed answer translated as it passes: each `feed` may emit nothing (an event is still
/// partial) or several translated events; `finish` flushes what the end of the stream implies
/// (the final chunk, `data: [DONE]`).
pub trait StreamTranslator {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed>;
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed>;
    /// The counts the backend reported so far, whether or not the client asked for them (token
    /// budgets and metrics settle from them).
    fn usage(&self) -> Option<openai::TokenUsage> {
        None
    }
}

/// The parsed JSON object of a request body.
pub fn parse_request(body: &[u8]) -> Result<serde_json::Map<String, Value>, Refusal> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Refusal::Invalid("the body must be a JSON object".into())),
        Err(e) => Err(Refusal::Invalid(format!("the body is not valid JSON: {e}"))),
    }
}

/// The parsed JSON object of a backend's answer.
pub fn parse_answer(body: &[u8]) -> Result<serde_json::Map<String, Value>, Malformed> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Malformed::new("the backend's answer is not a JSON object")),
        Err(_) => Err(Malformed::new("the backend's answer is not valid JSON")),
    }
}
