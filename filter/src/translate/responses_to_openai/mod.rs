//! OpenAI's Responses API as the CLIENT's protocol: Codex CLI, the OpenAI Agents SDK and the
//! OpenAI SDKs' `responses.create` send `POST /v1/responses`; the backend speaks OpenAI chat
//! completions. The request goes one way (`to_chat_request`), the answer the other
//! (`from_chat_response`; a stream through [`stream::ResponseStream`]). Errors keep OpenAI's
//! shape, which the Responses API shares.
//!
//! Skeleton: the translation lands in the next commits; until then every request is refused as
//! unsupported (and no endpoint routes here yet).

pub mod stream;

use super::{
    not_translated, Malformed, Object, Refusal, ReplyContext, StreamTranslator, Translator,
    Upstream,
};
use crate::endpoint::Endpoint;
use serde_json::Value;

/// A Responses API client in front of an OpenAI chat-completions backend.
pub struct ResponsesToOpenAi;

impl Translator for ResponsesToOpenAi {
    fn backend(&self) -> &'static str {
        "OpenAI chat completions"
    }

    fn request(
        &self,
        endpoint: Endpoint,
        _request: &Object,
        _model: &str,
    ) -> Result<Value, Refusal> {
        Err(not_translated(endpoint, self.backend()))
    }

    fn upstream_path(&self, _: Endpoint, upstream: &Upstream<'_>, _stream: bool) -> String {
        upstream.chat_path.to_string()
    }

    fn answer(
        &self,
        _: Endpoint,
        _body: &[u8],
        _reply: &ReplyContext,
    ) -> Result<Vec<u8>, Malformed> {
        Err(Malformed::new("the Responses translation is not there yet"))
    }

    fn stream(&self, reply: ReplyContext) -> Box<dyn StreamTranslator> {
        Box::new(stream::ResponseStream::new(reply))
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        super::messages_to_openai::openai_error_message(body)
    }
}

/// The ids a translated answer carries, made by the gateway from the request's nonce (unique
/// per request, the same in a whole answer and in every event of its stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseIds {
    nonce: u64,
}

impl ResponseIds {
    pub fn new(reply: &ReplyContext) -> ResponseIds {
        ResponseIds { nonce: reply.nonce }
    }

    /// The Response's `id`.
    pub fn response(self) -> String {
        format!("resp_{:016x}", self.nonce)
    }

    /// The id of the answer's message item.
    pub fn message(self) -> String {
        format!("msg_{:016x}", self.nonce)
    }

    /// The id of the answer's `index`th function call item (its `call_id` is the backend's).
    pub fn function_call(self, index: u64) -> String {
        format!("fc_{:016x}_{index}", self.nonce)
    }
}
