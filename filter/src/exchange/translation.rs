//! An exchange with an instance whose adapter translates: the request rewritten whole for the
//! instance's protocol (`translate/`), and the answer rewritten back, whole or chunk by chunk.
//! Pure: the exchange reads and writes the bytes; this decides what they become.

use crate::config::Adapter;
use crate::endpoint::Endpoint;
use crate::reply::{ClientError, LocalReply};
use crate::translate::Protocol;
use crate::translate::{
    self, messages_to_openai, openai, parse_request, Malformed, Refusal, ReplyContext,
    StreamTranslator, Translator, Upstream,
};
use serde_json::Value;

/// What a request needs translated once its body is whole (known when it is routed).
#[derive(Debug, Clone)]
pub struct Pending {
    pub protocol: Protocol,
    /// The instance's adapter's name (for a refusal that names it).
    pub adapter: String,
    pub endpoint: Endpoint,
    /// The model asked of the instance (its `name`).
    pub model: String,
    /// The instance's base-url path prefix and its `path` as configured.
    pub prefix: String,
    pub path_given: Option<String>,
    /// The instance's chat completions path (where a Messages request goes, translated).
    pub chat_path: String,
}

impl Pending {
    fn upstream(&self) -> Upstream<'_> {
        Upstream {
            model: &self.model,
            prefix: &self.prefix,
            path_given: self.path_given.as_deref(),
            chat_path: &self.chat_path,
        }
    }
}

/// The translated request.
pub struct Outbound {
    pub path: String,
    pub body: Vec<u8>,
}

/// How the answer passes, decided at its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Unchanged (a passthrough instance's success).
    Pass,
    /// Translated chunk by chunk as it streams.
    Stream,
    /// Held until it is whole, then rewritten with its head (status, type, length).
    Whole,
}

/// The answer of a translated exchange.
pub struct Translation {
    /// `None`: a passthrough instance whose errors are rewritten (GPUStack's).
    translator: Option<&'static dyn Translator>,
    endpoint: Endpoint,
    reply: ReplyContext,
    /// The client asked for a stream (of chat: other endpoints answer whole).
    asked_stream: bool,
    /// The translator of the streamed answer, once its head said it streams.
    stream: Option<Box<dyn StreamTranslator>>,
    /// The stream broke (malformed output): the rest of it is dropped.
    broken: bool,
    /// The client asked for base64 embeddings (the OpenAI SDKs' default).
    base64: bool,
}

/// Whether a request on `endpoint` to an instance of `adapter` is translated (Anthropic's
/// endpoints pass through to Anthropic backends, OpenAI's to OpenAI ones, Responses to a backend
/// that serves them itself).
pub fn translates(endpoint: Endpoint, adapter: &Adapter) -> bool {
    if endpoint == Endpoint::Responses && adapter.serves_responses {
        return false;
    }
    translate::translator(endpoint, adapter.protocol).is_some()
}

impl Translation {
    /// A passthrough instance whose error bodies need rewriting (`adapter: gpustack`).
    pub fn errors_only(endpoint: Endpoint) -> Translation {
        Translation {
            translator: None,
            endpoint,
            reply: ReplyContext {
                model: String::new(),
                created: 0,
                include_usage: false,
                nonce: 0,
            },
            asked_stream: false,
            stream: None,
            broken: false,
            base64: false,
        }
    }

    /// Translates a whole request body for its instance's protocol. `Err` is the client's answer
    /// from the gateway: a refusal (400 for a body that is not a valid request, 501 for what the
    /// protocol lacks), or a `count_tokens` estimate for a backend that cannot count.
    pub fn request(
        pending: &Pending,
        body: &[u8],
        created: u64,
        nonce: u64,
    ) -> Result<(Translation, Outbound), LocalReply> {
        let Some(translator) = translate::translator(pending.endpoint, pending.protocol) else {
            return Err(LocalReply::error(
                ClientError::NotSupportedByAdapter,
                "the instance speaks the client's protocol: there is nothing to translate",
            ));
        };
        let refused = |refusal| refused(pending, translator, refusal);
        if pending.endpoint == Endpoint::Responses && pending.protocol != Protocol::OpenAi {
            return Err(LocalReply::error(
                ClientError::NotSupportedByAdapter,
                &format!(
                    "The model `{}` is served through adapter `{}`: the Responses API reaches \
                     chat-completions and Responses backends only.",
                    pending.model, pending.adapter
                ),
            ));
        }
        let request = parse_request(body).map_err(refused)?;
        if pending.endpoint == Endpoint::CountTokens {
            let count = messages_to_openai::count_tokens(&request);
            return Err(LocalReply::json(
                200,
                format!("{{\"input_tokens\":{count}}}"),
            ));
        }
        let body = translator
            .request(pending.endpoint, &request, &pending.model)
            .map_err(refused)?
            .to_string()
            .into_bytes();
        let stream = openai::is_stream(&request)
            && matches!(
                pending.endpoint,
                Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses
            );
        let path = translator.upstream_path(pending.endpoint, &pending.upstream(), stream);
        let translation = Translation {
            translator: Some(translator),
            endpoint: pending.endpoint,
            reply: ReplyContext {
                model: pending.model.clone(),
                created,
                include_usage: openai::wants_usage(&request),
                nonce,
            },
            asked_stream: stream,
            stream: None,
            broken: false,
            base64: openai::wants_base64(&request),
        };
        Ok((translation, Outbound { path, body }))
    }

    /// How the answer with this status passes. A response that ends at its head passes as it is
    /// (there is no body to rewrite).
    pub fn on_head(&mut self, status: u32, end_of_stream: bool) -> Hold {
        if end_of_stream {
            return Hold::Pass;
        }
        let success = (200..300).contains(&status);
        match self.translator {
            // A passthrough instance's answer is rewritten only when it is a GPUStack error.
            None if success => Hold::Pass,
            Some(translator) if success && self.asked_stream => {
                self.stream = Some(translator.stream(self.reply.clone()));
                Hold::Stream
            }
            _ => Hold::Whole,
        }
    }

    /// Whether the usage scanner reads the answer before its translation rather than after
    /// ([`Translator::usage_in_backend_bytes`]).
    pub fn usage_before(&self) -> bool {
        self.translator.is_some_and(|t| t.usage_in_backend_bytes())
    }

    /// The counts a translated stream's backend reported (whether or not the client asked).
    pub fn stream_usage(&self) -> Option<openai::TokenUsage> {
        self.stream.as_ref().and_then(|t| t.usage())
    }

    /// Whether the answer is a translated stream.
    pub fn streams(&self) -> bool {
        self.stream.is_some()
    }

    /// Translates one chunk of a stream (and, at its end, what the end implies). `Err` carries
    /// the output with the error event that ends a stream gone bad.
    pub fn chunk(&mut self, chunk: &[u8], end_of_stream: bool) -> Result<Vec<u8>, Vec<u8>> {
        let mut out = Vec::with_capacity(chunk.len().saturating_mul(2));
        if self.broken {
            return Ok(out);
        }
        let Some(translator) = self.stream.as_mut() else {
            return Ok(chunk.to_vec());
        };
        let mut result = translator.feed(chunk, &mut out);
        if result.is_ok() && end_of_stream {
            result = translator.finish(&mut out);
        }
        match result {
            Ok(()) => Ok(out),
            Err(Malformed(why)) => {
                self.broken = true;
                let why = format!("The backend's stream is malformed: {why}");
                translator.fail(&why, &mut out);
                Err(out)
            }
        }
    }

    /// A whole answer rewritten: its status and the client's body. A success that is not what
    /// the protocol promises is a 502; a backend's error keeps its status, in the client's shape.
    pub fn whole(&self, status: u32, body: &[u8]) -> Answer {
        if !(200..300).contains(&status) {
            return Answer {
                status,
                body: self.error(status, body),
                malformed: false,
            };
        }
        let translated = match self.translator {
            Some(translator) => translator.answer(self.endpoint, body, &self.reply),
            None => Ok(body.to_vec()),
        };
        let translated = match translated {
            Ok(body) if self.base64 && self.endpoint == Endpoint::Embeddings => {
                base64_vectors(&body)
            }
            other => other,
        };
        match translated {
            Ok(body) => Answer {
                status,
                body,
                malformed: false,
            },
            Err(Malformed(why)) => {
                let why = format!("The backend's answer is malformed: {why}");
                let body = if self.endpoint.is_anthropic() {
                    messages_to_openai::error_body(502, &why)
                } else {
                    openai::error_body(502, &why, Some(ClientError::BadBackendOutput.code()))
                };
                Answer {
                    status: 502,
                    body,
                    malformed: true,
                }
            }
        }
    }

    /// A backend's error body in the client's protocol, with the same status.
    fn error(&self, status: u32, body: &[u8]) -> Vec<u8> {
        let message = match self.translator {
            Some(translator) => translator.error_message(body),
            None => {
                gpustack_message(body).or_else(|| messages_to_openai::openai_error_message(body))
            }
        };
        let message = message.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(200).collect();
            if text.is_empty() {
                format!("The backend answered {status}.")
            } else {
                format!("The backend answered {status}: {text}")
            }
        });
        if self.endpoint.is_anthropic() {
            return messages_to_openai::error_body(status, &message);
        }
        openai::error_body(status, &message, None)
    }
}

/// A rewritten answer.
pub struct Answer {
    pub status: u32,
    pub body: Vec<u8>,
    /// The backend's success was not what its protocol promises (it counts as its failure).
    pub malformed: bool,
}

fn refused(pending: &Pending, translator: &dyn Translator, refusal: Refusal) -> LocalReply {
    match refusal {
        Refusal::Invalid(why) => LocalReply::error(ClientError::InvalidJson, &why),
        Refusal::Unsupported(why) => LocalReply::error(
            ClientError::NotSupportedByAdapter,
            &format!(
                "{why} (the model `{}` is served by a {} backend)",
                pending.model,
                translator.backend()
            ),
        ),
    }
}

/// An OpenAI embedding list with its vectors as base64 floats, as `encoding_format: base64` asks.
fn base64_vectors(list: &[u8]) -> Result<Vec<u8>, Malformed> {
    let mut list: Value = serde_json::from_slice(list)
        .map_err(|_| Malformed::new("the embedding list is not JSON"))?;
    openai::base64_embeddings(&mut list);
    Ok(list.to_string().into_bytes())
}

/// GPUStack's error shape: `{"status_code": 404, "detail": "..."}`.
fn gpustack_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("status_code")?;
    match value.get("detail")? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn pending(protocol: Protocol, endpoint: Endpoint, prefix: &str) -> Pending {
        Pending {
            protocol,
            adapter: "a".into(),
            endpoint,
            model: "m-1".into(),
            prefix: prefix.into(),
            path_given: None,
            chat_path: format!("{prefix}/v1/chat/completions"),
        }
    }

    fn upstream_path(pending: &Pending, stream: bool) -> String {
        let translator = translate::translator(pending.endpoint, pending.protocol).unwrap();
        translator.upstream_path(pending.endpoint, &pending.upstream(), stream)
    }

    #[test]
    fn each_protocol_has_its_native_path() {
        let chat = Endpoint::ChatCompletions;
        assert_eq!(
            upstream_path(&pending(Protocol::Anthropic, chat, ""), false),
            "/v1/messages"
        );
        assert_eq!(
            upstream_path(&pending(Protocol::Anthropic, chat, "/x/v1"), true),
            "/x/v1/messages"
        );
        assert_eq!(
            upstream_path(&pending(Protocol::Gemini, chat, ""), true),
            "/v1beta/models/m-1:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            upstream_path(
                &pending(Protocol::Gemini, Endpoint::Embeddings, "/v1beta"),
                false
            ),
            "/v1beta/models/m-1:batchEmbedContents"
        );
        assert_eq!(
            upstream_path(&pending(Protocol::Ollama, chat, "/o"), true),
            "/o/api/chat"
        );
        assert_eq!(
            upstream_path(&pending(Protocol::Ollama, Endpoint::Embeddings, ""), false),
            "/api/embed"
        );
    }

    #[test]
    fn responses_are_translated_for_chat_instances_and_pass_to_those_that_serve_them() {
        let mut adapter = Adapter::normal();
        assert!(translates(Endpoint::Responses, &adapter));
        let translator = translate::translator(Endpoint::Responses, Protocol::OpenAi);
        assert_eq!(
            translator.map(|t| t.backend()),
            Some("OpenAI chat completions")
        );
        adapter.serves_responses = true;
        assert!(!translates(Endpoint::Responses, &adapter));
        // The declaration is about Responses only: chat still passes, Messages is translated.
        assert!(!translates(Endpoint::ChatCompletions, &adapter));
        assert!(translates(Endpoint::Messages, &adapter));
    }

    #[test]
    fn refusals_are_400_for_bad_bodies_and_501_for_what_the_protocol_lacks() {
        let p = pending(Protocol::Anthropic, Endpoint::ChatCompletions, "");
        let bad = Translation::request(&p, b"{not json", 1, 0)
            .err()
            .map(|r| r.status);
        assert_eq!(bad, Some(400));
        let legacy = pending(Protocol::Anthropic, Endpoint::Completions, "");
        let lacking = Translation::request(&legacy, br#"{"model":"m","prompt":"x"}"#, 1, 0)
            .err()
            .map(|r| r.status);
        assert_eq!(lacking, Some(501));
    }

    #[test]
    fn gpustack_errors_become_openai_errors_with_their_status() {
        let mut t = Translation::errors_only(Endpoint::ChatCompletions);
        assert_eq!(t.on_head(200, false), Hold::Pass);
        assert_eq!(t.on_head(404, false), Hold::Whole);
        let answer = t.whole(404, br#"{"status_code":404,"detail":"model not loaded"}"#);
        assert_eq!(answer.status, 404);
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["error"]["message"], "model not loaded");
        assert_eq!(body["error"]["type"], "not_found_error");
    }

    #[test]
    fn a_backend_error_keeps_its_status_and_malformed_success_is_502() {
        let p = pending(Protocol::Ollama, Endpoint::ChatCompletions, "");
        let (mut t, out) = Translation::request(
            &p,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            1,
            0,
        )
        .ok()
        .unwrap();
        assert_eq!(out.path, "/api/chat");
        assert_eq!(t.on_head(500, false), Hold::Whole);
        let answer = t.whole(500, br#"{"error":"out of memory"}"#);
        assert_eq!(answer.status, 500);
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["error"]["message"], "out of memory");
        let bad = t.whole(200, b"<html>");
        assert_eq!((bad.status, bad.malformed), (502, true));
    }
}
