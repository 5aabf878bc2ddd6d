//! Translation between the protocol a client speaks and the one its instance's backend speaks.
//! Pure: bytes and JSON in, bytes out, no host calls. The exchange feeds it from its body
//! callbacks: a request is translated whole (it is buffered anyway, bounded by
//! `gateway.max-body-bytes`), an answer whole when it is not streamed, and a stream chunk by
//! chunk, with partial events carried over and never held.
//!
//! The modules are named `<client>_to_<backend>`, for who speaks what:
//! - `openai_to_claude`, `openai_to_gemini`, `openai_to_ollama`: an OpenAI client (the OpenAI
//!   SDKs, most tools) in front of an instance whose `adapter:` speaks Anthropic Messages, the
//!   Gemini API or Ollama's native API;
//! - `messages_to_openai`: the other way round, a client speaking Anthropic Messages (Claude
//!   Code, the Anthropic SDKs) in front of an OpenAI-compatible backend;
//! - `responses_to_openai`: a client speaking OpenAI's Responses API (Codex CLI, the Agents
//!   SDK) in front of a chat-completions backend.
//!
//! Each implements [`Translator`], the one contract, and says what its protocol is (its
//! [`Backend`]); [`Protocol::backend`] is the one dispatch: adding a protocol is its module, its
//! variant and its line there. What they
//! share: `openai` (the OpenAI shapes: completions, embeddings, errors, request readers),
//! `chunks` (the one writer of an OpenAI chat stream) and `frames` (SSE and NDJSON framing).
//! Each module's whole cases (a request, an answer, a stream in; what the other side gets out)
//! are files under `fixtures/<module>/`, run through the dispatch by `fixtures.rs`.

pub mod chunks;
#[cfg(test)]
mod fixtures;
pub mod frames;
pub mod messages_to_openai;
pub mod openai;
pub mod openai_to_claude;
pub mod openai_to_gemini;
pub mod openai_to_ollama;
pub mod responses_to_openai;

use crate::endpoint::{Endpoint, ServiceType};
use serde_json::Value;

/// A JSON object, as requests and answers are parsed.
pub type Object = serde_json::Map<String, Value>;

/// How requests from one client protocol reach backends of another, and their answers come back.
/// A translator is a unit struct; the exchange holds it as `&'static dyn Translator`.
pub trait Translator: Sync {
    /// The backend's protocol, named for messages ("Anthropic").
    fn backend(&self) -> &'static str;
    /// The client's request on `endpoint` (a JSON object) as the backend's body for `model`.
    /// An endpoint it does not translate is `Refusal::Unsupported` ([`not_translated`]).
    fn request(&self, endpoint: Endpoint, request: &Object, model: &str) -> Result<Value, Refusal>;
    /// Where the translated request goes on the instance.
    fn upstream_path(&self, endpoint: Endpoint, upstream: &Upstream<'_>, stream: bool) -> String;
    /// The backend's whole successful answer as the client's.
    fn answer(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        reply: &ReplyContext,
    ) -> Result<Vec<u8>, Malformed>;
    /// The translator of the backend's streamed answer (a chat's).
    fn stream(&self, reply: ReplyContext) -> Box<dyn StreamTranslator>;
    /// The message of a backend's error body, when it has one.
    fn error_message(&self, body: &[u8]) -> Option<String>;
    /// Where the usage scanner reads an answer's counts: in the backend's own bytes (it reads
    /// OpenAI's and Anthropic's usage keys, so an Anthropic answer's counts are exact even when
    /// the client asked no usage chunk) rather than in the translated answer (OpenAI's, plus
    /// the counts the stream translator reports).
    fn usage_in_backend_bytes(&self) -> bool {
        false
    }
}

/// The wire protocol of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The OpenAI API: bodies pass through unchanged.
    OpenAi,
    /// Anthropic Messages (`adapter: claude`).
    Anthropic,
    /// Google's Gemini API (`adapter: gemini`).
    Gemini,
    /// Ollama's native `/api/chat` and `/api/embed` (`adapter: ollama`).
    Ollama,
}

/// A backend protocol as the gateway knows it: what it is called and what an OpenAI client
/// reaches through it. Each protocol's module has its one `BACKEND`.
pub struct Backend {
    /// `gen_ai.provider.name` (OpenTelemetry's GenAI conventions) of an instance speaking it:
    /// their well-known values (`gcp.gemini` is Google's Gemini API); Ollama has none.
    pub gen_ai_provider: &'static str,
    /// The service types the gateway serves through it.
    pub services: &'static [ServiceType],
    /// How an OpenAI client's requests reach it; `None`: they pass as they are.
    pub from_openai: Option<&'static dyn Translator>,
}

impl Protocol {
    /// The protocol's backend: the one dispatch.
    pub fn backend(self) -> &'static Backend {
        match self {
            Protocol::OpenAi => &openai::BACKEND,
            Protocol::Anthropic => &openai_to_claude::BACKEND,
            Protocol::Gemini => &openai_to_gemini::BACKEND,
            Protocol::Ollama => &openai_to_ollama::BACKEND,
        }
    }

    pub fn gen_ai_provider(self) -> &'static str {
        self.backend().gen_ai_provider
    }

    pub fn services(self) -> &'static [ServiceType] {
        self.backend().services
    }
}

/// The translator of requests on `endpoint` to a `protocol` instance. `None` when they pass as
/// they are (Anthropic's endpoints to Anthropic backends, OpenAI's to OpenAI ones). A Responses
/// request to an OpenAI-compatible instance is translated to chat completions; one whose adapter
/// says it serves Responses itself passes, which the exchange decides before asking here
/// (`exchange::translation::translates`).
pub fn translator(endpoint: Endpoint, protocol: Protocol) -> Option<&'static dyn Translator> {
    match protocol {
        // A client speaking Anthropic Messages or OpenAI Responses: the other way round. (Other
        // backends' OpenAI translators refuse their endpoints.)
        Protocol::OpenAi if endpoint.is_anthropic() => Some(&messages_to_openai::MessagesToOpenAi),
        Protocol::OpenAi if endpoint == Endpoint::Responses => {
            Some(&responses_to_openai::ResponsesToOpenAi)
        }
        Protocol::Anthropic if endpoint.is_anthropic() => None,
        other => other.backend().from_openai,
    }
}

/// What of an instance decides where its translated requests go.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    /// The model asked of the instance (its `name`).
    pub model: &'a str,
    /// The instance's base-url path prefix.
    pub prefix: &'a str,
    /// Its `path`, as configured.
    pub path_given: Option<&'a str>,
    /// Its chat completions path.
    pub chat_path: &'a str,
}

/// The refusal of an endpoint a translator does not translate.
pub fn not_translated(endpoint: Endpoint, backend: &str) -> Refusal {
    Refusal::Unsupported(format!(
        "/v1/{} is not translated for {backend} backends",
        endpoint.suffix()
    ))
}

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
    /// A number drawn at random for the request: ids a translator makes of its own (a Responses
    /// answer's `resp_…`) are unique per request, never derived from the backend's.
    pub nonce: u64,
}

/// A streamed answer translated as it passes: each `feed` may emit nothing (an event is still
/// partial) or several translated events; `finish` flushes what the end of the stream implies
/// (the final chunk, `data: [DONE]`).
pub trait StreamTranslator {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed>;
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed>;
    /// Ends a stream gone bad (`feed` or `finish` said `Malformed`) the way the client's
    /// protocol ends a failed stream: by default OpenAI's error event and `[DONE]`.
    fn fail(&mut self, why: &str, out: &mut Vec<u8>) {
        chunks::failed(out, why);
    }
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
