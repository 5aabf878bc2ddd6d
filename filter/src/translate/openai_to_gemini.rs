//! OpenAI ↔ the Gemini API (generativelanguage.googleapis.com, v1beta): chat completions as
//! `generateContent` / `streamGenerateContent?alt=sse`, embeddings as `batchEmbedContents`.
//!
//! Gemini names the assistant `model`, keeps system text apart (`systemInstruction`), wants
//! turns of alternating roles, and answers tool calls by function name rather than by id: the
//! names come from the assistant tool calls earlier in the same request. Its stream is SSE with
//! one `GenerateContentResponse` per event and no end marker, so only a `finishReason` tells a
//! finished stream from a cut one.

use super::chunks::{self, ChunkWriter};
use super::frames::{Event, SseEvents};
use super::openai::{self, TokenUsage};
use super::{
    not_translated, parse_answer, Backend, Malformed, Object, Refusal, ReplyContext,
    StreamTranslator, Translator, Upstream,
};
use crate::endpoint::{Endpoint, ServiceType};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Gemini 3 refuses a replayed function call without the `thoughtSignature` it was answered
/// with, which OpenAI clients do not keep; this value is the one Google documents for function
/// calls that did not come from the model as they stand.
const NO_THOUGHT_SIGNATURE: &str = "skip_thought_signature_validator";

/// The Gemini API: chat and embeddings.
pub static BACKEND: Backend = Backend {
    gen_ai_provider: "gcp.gemini",
    services: &[ServiceType::Chat, ServiceType::Embedding],
    from_openai: Some(&OpenAiToGemini),
};

/// An OpenAI client in front of the Gemini API: chat completions and embeddings.
pub struct OpenAiToGemini;

impl Translator for OpenAiToGemini {
    fn backend(&self) -> &'static str {
        "Gemini"
    }

    fn request(&self, endpoint: Endpoint, request: &Object, model: &str) -> Result<Value, Refusal> {
        match endpoint {
            Endpoint::ChatCompletions => chat_request(request),
            Endpoint::Embeddings => embed_request(request, model),
            other => Err(not_translated(other, self.backend())),
        }
    }

    fn upstream_path(&self, endpoint: Endpoint, upstream: &Upstream<'_>, stream: bool) -> String {
        let prefix = upstream.prefix;
        let version = if prefix.ends_with("/v1beta") || prefix.ends_with("/v1") {
            ""
        } else {
            "/v1beta"
        };
        let model = upstream
            .model
            .strip_prefix("models/")
            .unwrap_or(upstream.model);
        let method = match (endpoint, stream) {
            (Endpoint::Embeddings, _) => "batchEmbedContents",
            (_, true) => "streamGenerateContent?alt=sse",
            (_, false) => "generateContent",
        };
        format!("{prefix}{version}/models/{model}:{method}")
    }

    fn answer(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        reply: &ReplyContext,
    ) -> Result<Vec<u8>, Malformed> {
        match endpoint {
            Endpoint::Embeddings => embed_response(body, reply),
            _ => chat_response(body, reply),
        }
    }

    fn stream(&self, reply: ReplyContext) -> Box<dyn StreamTranslator> {
        Box::new(ChatStream::new(reply))
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        error_message(body)
    }
}

/// OpenAI chat request → GenerateContentRequest body (the caller builds the URL
/// `/v1beta/models/{model}:generateContent` or `:streamGenerateContent?alt=sse`).
pub fn chat_request(request: &Map<String, Value>) -> Result<Value, Refusal> {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Refusal::Invalid("`messages` must be a non-empty list".into()))?;
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    // Tool results name their call by id, Gemini by function name.
    let mut tool_names: HashMap<String, String> = HashMap::new();
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| Refusal::Invalid("every message needs a `role`".into()))?;
        let (role, parts) = match role {
            "system" | "developer" => {
                let text = openai::content_text(message.get("content").unwrap_or(&Value::Null));
                if !text.is_empty() {
                    system.push(json!({"text": text}));
                }
                continue;
            }
            "user" => ("user", user_parts(message.get("content"))?),
            "assistant" => ("model", assistant_parts(message, &mut tool_names)?),
            "tool" => ("user", vec![tool_result(message, &tool_names)?]),
            other => return Err(Refusal::Invalid(format!("unknown message role `{other}`"))),
        };
        if parts.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, earlier)) if *last == role => earlier.extend(parts),
            _ => turns.push((role, parts)),
        }
    }
    let contents: Vec<Value> = turns
        .into_iter()
        .map(|(role, parts)| json!({"role": role, "parts": parts}))
        .collect();
    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let config = generation_config(request)?;
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(declarations) = function_declarations(request.get("tools"))? {
        body.insert(
            "tools".into(),
            json!([{"functionDeclarations": declarations}]),
        );
    }
    if let Some(mode) = calling_config(request.get("tool_choice"))? {
        body.insert("toolConfig".into(), json!({"functionCallingConfig": mode}));
    }
    Ok(Value::Object(body))
}

fn user_parts(content: Option<&Value>) -> Result<Vec<Value>, Refusal> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) if text.is_empty() => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![json!({"text": text})]),
        Some(Value::Array(parts)) => {
            let mut out = Vec::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = part.get("text").and_then(Value::as_str).unwrap_or_default();
                        if !text.is_empty() {
                            out.push(json!({"text": text}));
                        }
                    }
                    Some("image_url") => {
                        let (media, data) = openai::inline_image(part)?;
                        out.push(json!({"inlineData": {"mimeType": media, "data": data}}));
                    }
                    Some(other) => {
                        return Err(Refusal::Unsupported(format!(
                            "content parts of type `{other}`"
                        )))
                    }
                    None => return Err(Refusal::Invalid("a content part needs a `type`".into())),
                }
            }
            Ok(out)
        }
        Some(_) => Err(Refusal::Invalid(
            "message `content` must be a string or a list of parts".into(),
        )),
    }
}

fn assistant_parts(
    message: &Value,
    tool_names: &mut HashMap<String, String>,
) -> Result<Vec<Value>, Refusal> {
    let mut parts = Vec::new();
    let text = openai::content_text(message.get("content").unwrap_or(&Value::Null));
    if !text.is_empty() {
        parts.push(json!({"text": text}));
    }
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(calls)) => calls.as_slice(),
        Some(_) => return Err(Refusal::Invalid("`tool_calls` must be a list".into())),
    };
    for (i, call) in calls.iter().enumerate() {
        let (id, name, args) = openai::assistant_tool_call(call)?;
        let mut part = json!({"functionCall": {"name": name, "args": args}});
        if i == 0 {
            // Gemini 3 checks the first call of a step only (parallel calls share it).
            if let Some(part) = part.as_object_mut() {
                part.insert("thoughtSignature".into(), NO_THOUGHT_SIGNATURE.into());
            }
        }
        parts.push(part);
        tool_names.insert(id, name);
    }
    Ok(parts)
}

fn tool_result(message: &Value, tool_names: &HashMap<String, String>) -> Result<Value, Refusal> {
    let id = message
        .get("tool_call_id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = tool_names.get(id).ok_or_else(|| {
        Refusal::Invalid(format!(
            "the tool message for `{id}` answers no earlier assistant tool call"
        ))
    })?;
    let text = openai::content_text(message.get("content").unwrap_or(&Value::Null));
    Ok(json!({"functionResponse": {"name": name, "response": {"content": text}}}))
}

fn generation_config(request: &Map<String, Value>) -> Result<Map<String, Value>, Refusal> {
    let mut config = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(value) = openai::number(request, from)? {
            config.insert(to.into(), value);
        }
    }
    if let Some(limit) = openai::max_tokens(request)? {
        config.insert("maxOutputTokens".into(), limit);
    }
    let stop = openai::stop_list(request.get("stop"));
    if !stop.is_empty() {
        config.insert("stopSequences".into(), json!(stop));
    }
    if let Some(n) = openai::number(request, "n")? {
        if n.as_u64() != Some(1) && openai::is_stream(request) {
            // The stream translator follows one candidate.
            return Err(Refusal::Unsupported(
                "`n` other than 1 when streaming".into(),
            ));
        }
        config.insert("candidateCount".into(), n);
    }
    if let Some(format) = request.get("response_format").filter(|f| !f.is_null()) {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                config.insert("responseMimeType".into(), "application/json".into());
            }
            Some("json_schema") => {
                let schema = format
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .ok_or_else(|| {
                        Refusal::Invalid("`response_format.json_schema.schema` is missing".into())
                    })?;
                config.insert("responseMimeType".into(), "application/json".into());
                config.insert("responseJsonSchema".into(), schema.clone());
            }
            _ => {
                return Err(Refusal::Invalid(
                    "`response_format.type` must be text, json_object or json_schema".into(),
                ))
            }
        }
    }
    Ok(config)
}

fn function_declarations(tools: Option<&Value>) -> Result<Option<Vec<Value>>, Refusal> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(Refusal::Invalid("`tools` must be a list".into())),
    };
    let mut declarations = Vec::new();
    for tool in tools {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err(Refusal::Unsupported(format!("tools of type `{other}`"))),
            None => return Err(Refusal::Invalid("a tool needs a `type`".into())),
        }
        let function = tool.get("function").unwrap_or(&Value::Null);
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| Refusal::Invalid("a function tool needs a `name`".into()))?;
        let mut declaration = Map::new();
        declaration.insert("name".into(), name.into());
        if let Some(description) = function.get("description").and_then(Value::as_str) {
            declaration.insert("description".into(), description.into());
        }
        // `parametersJsonSchema` takes JSON Schema as OpenAI tools write it; `parameters` takes
        // an OpenAPI subset that refuses fields such as `additionalProperties`.
        if let Some(parameters) = function.get("parameters").filter(|p| !p.is_null()) {
            declaration.insert("parametersJsonSchema".into(), parameters.clone());
        }
        declarations.push(Value::Object(declaration));
    }
    Ok(Some(declarations))
}

fn calling_config(choice: Option<&Value>) -> Result<Option<Value>, Refusal> {
    let config = match choice {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => json!({"mode": "AUTO"}),
            "none" => json!({"mode": "NONE"}),
            "required" => json!({"mode": "ANY"}),
            _ => {
                return Err(Refusal::Invalid(
                    "`tool_choice` must be auto, none, required or a function".into(),
                ))
            }
        },
        Some(choice) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| Refusal::Invalid("`tool_choice.function.name` is missing".into()))?;
            json!({"mode": "ANY", "allowedFunctionNames": [name]})
        }
    };
    Ok(Some(config))
}

/// GenerateContentResponse → OpenAI `chat.completion`, one choice per candidate.
pub fn chat_response(body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    let answer = parse_answer(body)?;
    let id = completion_id(&answer);
    let usage = answer.get("usageMetadata").map(usage_of);
    let candidates = match answer.get("candidates") {
        Some(Value::Array(candidates)) if !candidates.is_empty() => candidates,
        _ if blocked(&answer) => {
            let message = json!({"role": "assistant", "content": null});
            let completion = openai::chat_completion(
                &id,
                reply.created,
                &reply.model,
                message,
                Some("content_filter"),
                usage,
            );
            return Ok(completion.to_string().into_bytes());
        }
        _ => return Err(Malformed::new("the backend's answer has no candidates")),
    };
    let mut choices = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        choices.push(choice_of(candidate)?);
    }
    let mut choices = choices.into_iter();
    let Some((message, finish)) = choices.next() else {
        return Err(Malformed::new("the backend's answer has no candidates"));
    };
    let mut completion = openai::chat_completion(
        &id,
        reply.created,
        &reply.model,
        message,
        Some(finish),
        usage,
    );
    if let Some(list) = completion.get_mut("choices").and_then(Value::as_array_mut) {
        for (index, (message, finish)) in choices.enumerate() {
            list.push(json!({
                "index": index.saturating_add(1),
                "message": message,
                "logprobs": null,
                "finish_reason": finish,
            }));
        }
    }
    Ok(completion.to_string().into_bytes())
}

fn choice_of(candidate: &Value) -> Result<(Value, &'static str), Malformed> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for piece in pieces(candidate)? {
        match piece {
            Piece::Text(t) => text.push_str(t),
            Piece::Call { name, arguments } => calls.push(json!({
                "id": format!("call_{}", calls.len()),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            })),
        }
    }
    let finish = finish_reason(
        candidate.get("finishReason").and_then(Value::as_str),
        !calls.is_empty(),
    );
    let content = if text.is_empty() && (!calls.is_empty() || finish == "content_filter") {
        Value::Null
    } else {
        Value::String(text)
    };
    let mut message = json!({"role": "assistant", "content": content});
    if let (false, Some(map)) = (calls.is_empty(), message.as_object_mut()) {
        map.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok((message, finish))
}

/// What a candidate's parts say, in order: text (thoughts left out) and function calls.
enum Piece<'a> {
    Text(&'a str),
    Call { name: &'a str, arguments: String },
}

fn pieces(candidate: &Value) -> Result<Vec<Piece<'_>>, Malformed> {
    if !candidate.is_object() {
        return Err(Malformed::new(
            "the backend's answer has a candidate that is not an object",
        ));
    }
    let parts = match candidate.get("content").and_then(|c| c.get("parts")) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(Malformed::new(
                "the backend's answer has `parts` that are not a list",
            ))
        }
    };
    let mut out = Vec::new();
    for part in parts {
        if part.get("thought").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(text) = part.get("text").and_then(Value::as_str) {
            if !text.is_empty() {
                out.push(Piece::Text(text));
            }
        } else if let Some(call) = part.get("functionCall") {
            let name = call.get("name").and_then(Value::as_str).ok_or_else(|| {
                Malformed::new("the backend's answer has a function call without a name")
            })?;
            let arguments = match call.get("args") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(args) => args.to_string(),
            };
            out.push(Piece::Call { name, arguments });
        }
    }
    Ok(out)
}

fn finish_reason(reason: Option<&str>, tool_calls: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY",
        ) => "content_filter",
        _ if tool_calls => "tool_calls",
        _ => "stop",
    }
}

fn blocked(answer: &Map<String, Value>) -> bool {
    answer
        .get("promptFeedback")
        .and_then(|f| f.get("blockReason"))
        .is_some_and(|r| !r.is_null())
}

fn completion_id(answer: &Map<String, Value>) -> String {
    match answer.get("responseId").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => format!("chatcmpl-{id}"),
        _ => "chatcmpl-gemini".into(),
    }
}

fn count(meta: &Value, key: &str) -> u64 {
    meta.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Thinking is billed as output, as OpenAI counts reasoning tokens into completion tokens.
fn usage_of(meta: &Value) -> TokenUsage {
    TokenUsage {
        prompt: count(meta, "promptTokenCount"),
        completion: count(meta, "candidatesTokenCount")
            .saturating_add(count(meta, "thoughtsTokenCount")),
    }
}

/// `streamGenerateContent?alt=sse` → OpenAI chunks, following the first candidate.
pub struct ChatStream {
    events: SseEvents,
    state: StreamState,
}

struct StreamState {
    chunks: ChunkWriter,
    /// A response came (the role chunk is out).
    started: bool,
    /// The finish chunk is out; later responses only update the usage.
    finished: bool,
    /// An error event and `[DONE]` are out; the rest of the stream is ignored.
    over: bool,
    tool_calls: usize,
    usage: TokenUsage,
}

impl ChatStream {
    pub fn new(reply: ReplyContext) -> ChatStream {
        ChatStream {
            events: SseEvents::new(),
            state: StreamState {
                chunks: ChunkWriter::new(reply, "chatcmpl-gemini"),
                started: false,
                finished: false,
                over: false,
                tool_calls: 0,
                usage: TokenUsage::default(),
            },
        }
    }
}

impl StreamTranslator for ChatStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        let Self { events, state } = self;
        events.feed(chunk, &mut |event| state.on_event(event, out))
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let Self { events, state } = self;
        events.finish(&mut |event| state.on_event(event, out))?;
        if state.over {
            return Ok(());
        }
        if !state.started || !state.finished {
            return Err(Malformed::new("the backend's stream ended early"));
        }
        // Gemini's stream has no end marker: its end is the stream's.
        state.chunks.over(out, state.usage);
        state.over = true;
        Ok(())
    }

    fn usage(&self) -> Option<TokenUsage> {
        self.state.started.then_some(self.state.usage)
    }
}

impl StreamState {
    fn on_event(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.over {
            return Ok(());
        }
        let data = event.data.trim_ascii();
        if data.is_empty() || data == b"[DONE]" {
            return Ok(());
        }
        let response: Map<String, Value> = match serde_json::from_slice(data) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(Malformed::new(
                    "the backend's stream has an event that is not a JSON object",
                ))
            }
        };
        if let Some(error) = response.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the backend reported an error");
            chunks::failed(out, message);
            self.over = true;
            return Ok(());
        }
        if !self.started {
            self.chunks.set_id(completion_id(&response));
            self.started = true;
            self.chunks.role(out);
        }
        if let Some(meta) = response.get("usageMetadata") {
            // Some events carry usageMetadata without counts.
            if meta.get("promptTokenCount").is_some() || meta.get("candidatesTokenCount").is_some()
            {
                self.usage = usage_of(meta);
            }
        }
        if self.finished {
            return Ok(());
        }
        let candidate = match response.get("candidates") {
            Some(Value::Array(candidates)) => candidates.first(),
            _ => None,
        };
        match candidate {
            Some(candidate) => self.on_candidate(candidate, out),
            None if blocked(&response) => {
                self.finish_with(out, "content_filter");
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn on_candidate(&mut self, candidate: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        for piece in pieces(candidate)? {
            match piece {
                Piece::Text(text) => self.chunks.content(out, text),
                Piece::Call { name, arguments } => {
                    let index = self.tool_calls;
                    self.tool_calls = index.saturating_add(1);
                    let id = format!("call_{index}");
                    self.chunks.tool_call(out, index, &id, name, &arguments);
                }
            }
        }
        if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
            self.finish_with(out, finish_reason(Some(reason), self.tool_calls > 0));
        }
        Ok(())
    }

    fn finish_with(&mut self, out: &mut Vec<u8>, reason: &str) {
        self.chunks.finish(out, reason);
        self.finished = true;
    }
}

/// OpenAI embeddings request → BatchEmbedContentsRequest
/// (`requests:[{model:"models/<model>", content:{parts:[{text}]}}]`, `dimensions` →
/// `outputDimensionality`), for `/v1beta/models/{model}:batchEmbedContents`.
pub fn embed_request(request: &Map<String, Value>, model: &str) -> Result<Value, Refusal> {
    let inputs = openai::embedding_inputs(request)?;
    let dimensions = openai::number(request, "dimensions")?;
    let model = if model.starts_with("models/") {
        model.to_string()
    } else {
        format!("models/{model}")
    };
    let requests: Vec<Value> = inputs
        .into_iter()
        .map(|text| {
            let mut one = json!({"model": model, "content": {"parts": [{"text": text}]}});
            if let (Some(dimensions), Some(map)) = (&dimensions, one.as_object_mut()) {
                map.insert("outputDimensionality".into(), dimensions.clone());
            }
            one
        })
        .collect();
    Ok(json!({"requests": requests}))
}

/// BatchEmbedContentsResponse `{embeddings:[{values}]}` → OpenAI embedding list. Gemini reports
/// no token counts for embeddings, so the usage is 0.
pub fn embed_response(body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    let answer = parse_answer(body)?;
    let embeddings = answer
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or_else(|| Malformed::new("the backend's answer has no embeddings"))?;
    let mut vectors = Vec::with_capacity(embeddings.len());
    for embedding in embeddings {
        match embedding.get("values") {
            Some(values @ Value::Array(_)) => vectors.push(values.clone()),
            _ => {
                return Err(Malformed::new(
                    "the backend's answer has an embedding without values",
                ))
            }
        }
    }
    Ok(openai::embedding_list(&reply.model, vectors, 0)
        .to_string()
        .into_bytes())
}

/// Gemini error body `{"error":{"code","message","status"}}` (or a list of one, as Gemini
/// answers some streamed requests) → its message.
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let value = match &value {
        Value::Array(items) => items.first()?,
        other => other,
    };
    value
        .get("error")?
        .get("message")?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use crate::translate::frames::{same_under_any_chunking, sse_payloads};
    use crate::translate::parse_request;

    fn request(value: Value) -> Map<String, Value> {
        parse_request(value.to_string().as_bytes()).unwrap()
    }

    fn reply(include_usage: bool) -> ReplyContext {
        ReplyContext {
            model: "gemini-2.5-flash".into(),
            created: 1_700_000_000,
            include_usage,
            nonce: 0,
        }
    }

    fn completion(body: Value) -> Value {
        let out = chat_response(body.to_string().as_bytes(), &reply(false)).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn a_chat_request_becomes_a_generation_config() {
        // Contents, a system instruction and the whole generation config: the case
        // fixtures/openai_to_gemini/request-chat.
        let body = chat_request(&request(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100,
            "stop": ["a", "b"],
            "n": 2
        })))
        .unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 100, "stopSequences": ["a", "b"], "candidateCount": 2})
        );
        assert!(body.get("systemInstruction").is_none());
    }

    #[test]
    fn tool_choices_become_function_calling_modes() {
        // Tools, calls and results as function declarations, calls and responses: the case
        // fixtures/openai_to_gemini/request-tools.
        let choice = |choice: Value| {
            chat_request(&request(
                json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": choice}),
            ))
            .unwrap()["toolConfig"]["functionCallingConfig"]
                .clone()
        };
        assert_eq!(choice(json!("auto")), json!({"mode": "AUTO"}));
        assert_eq!(choice(json!("none")), json!({"mode": "NONE"}));
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "get_weather"}})),
            json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]})
        );
    }

    #[test]
    fn a_json_schema_response_format_becomes_a_response_json_schema() {
        let schema = json!({"type": "object", "properties": {"age": {"type": "integer"}}});
        let body = chat_request(&request(json!({
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}
        })))
        .unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"responseMimeType": "application/json", "responseJsonSchema": schema})
        );
    }

    #[test]
    fn requests_gemini_cannot_take_are_refused() {
        let refusal = |value: Value| chat_request(&request(value)).unwrap_err();
        let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
        assert!(matches!(
            refusal(user(
                json!([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])
            )),
            Refusal::Unsupported(_)
        ));
        assert!(matches!(
            refusal(user(
                json!([{"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}])
            )),
            Refusal::Unsupported(_)
        ));
        assert!(matches!(
            refusal(
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "custom", "custom": {"name": "x"}}]})
            ),
            Refusal::Unsupported(_)
        ));
        assert!(matches!(
            refusal(
                json!({"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": true})
            ),
            Refusal::Unsupported(_)
        ));
        for invalid in [
            json!({}),
            json!({"messages": []}),
            json!({"messages": [{"content": "x"}]}),
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            json!({"messages": [{"role": "tool", "tool_call_id": "nobody", "content": "x"}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}),
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}),
            user(json!(42)),
            user(json!([{"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}])),
        ] {
            assert!(
                matches!(refusal(invalid.clone()), Refusal::Invalid(_)),
                "{invalid}"
            );
        }
    }

    #[test]
    fn finish_reasons_map_to_openai_ones() {
        for (gemini, openai) in [
            ("STOP", "stop"),
            ("MAX_TOKENS", "length"),
            ("SAFETY", "content_filter"),
            ("RECITATION", "content_filter"),
            ("BLOCKLIST", "content_filter"),
            ("PROHIBITED_CONTENT", "content_filter"),
            ("SPII", "content_filter"),
            ("OTHER", "stop"),
            ("MALFORMED_FUNCTION_CALL", "stop"),
            ("FINISH_REASON_UNSPECIFIED", "stop"),
        ] {
            let out = completion(json!({"candidates": [{
                "content": {"role": "model", "parts": [{"text": "x"}]},
                "finishReason": gemini
            }]}));
            assert_eq!(out["choices"][0]["finish_reason"], openai, "{gemini}");
            assert!(out.get("usage").is_none());
        }
        // A candidate stopped for safety may have no content at all.
        let out = completion(json!({"candidates": [{"finishReason": "SAFETY", "index": 0}]}));
        assert_eq!(out["choices"][0]["message"]["content"], Value::Null);
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filtered_completion() {
        let out = completion(json!({
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
            "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}
        }));
        assert_eq!(out["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(
            out["choices"][0]["message"],
            json!({"role": "assistant", "content": null})
        );
        assert_eq!(out["usage"]["prompt_tokens"], 8);
    }

    #[test]
    fn several_candidates_become_several_choices() {
        let out = completion(json!({"candidates": [
            {"content": {"role": "model", "parts": [{"text": "one"}]}, "finishReason": "STOP", "index": 0},
            {"content": {"role": "model", "parts": [{"text": "two"}]}, "finishReason": "MAX_TOKENS", "index": 1}
        ]}));
        let choices = out["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        assert_eq!(choices[1]["index"], 1);
        assert_eq!(choices[1]["message"]["content"], "two");
        assert_eq!(choices[1]["finish_reason"], "length");
    }

    #[test]
    fn malformed_answers_are_malformed() {
        for body in [
            &b"not json"[..],
            b"[1]",
            b"{}",
            b"{\"candidates\":[]}",
            b"{\"candidates\":[7]}",
            b"{\"candidates\":[{\"content\":{\"parts\":{}}}]}",
            b"{\"candidates\":[{\"content\":{\"parts\":[{\"functionCall\":{\"args\":{}}}]}}]}",
        ] {
            assert!(
                chat_response(body, &reply(false)).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    const STREAM: &str = include_str!("fixtures/openai_to_gemini/stream-text.in.sse");

    fn stream(include_usage: bool, body: &str) -> Result<Vec<Value>, Malformed> {
        same_under_any_chunking(|| ChatStream::new(reply(include_usage)), body.as_bytes())
            .map(|out| sse_payloads(&out))
    }
    #[test]
    fn a_stream_reads_the_same_with_lf_line_endings_and_no_last_blank_line() {
        // The chunks with and without the usage chunk: the case fixtures/openai_to_gemini/stream-text.
        // LF line endings, and a last event the stream ends on without a blank line.
        let lf = STREAM.replace("\r\n", "\n");
        assert_eq!(
            stream(false, lf.trim_end()).unwrap(),
            stream(false, STREAM).unwrap()
        );
    }

    #[test]
    fn streamed_function_calls_become_tool_call_deltas() {
        let body = concat!(
            "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"get_weather\",\"args\":{\"city\":\"Tokyo\"}},\"thoughtSignature\":\"c2ln\"}]}}]}\n\n",
            "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"get_time\"}}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":20,\"candidatesTokenCount\":6}}\n\n",
        );
        let out = stream(true, body).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(out[0]["id"], "chatcmpl-gemini");
        assert_eq!(
            out[1]["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Tokyo\"}"}}]})
        );
        assert_eq!(
            out[2]["choices"][0]["delta"]["tool_calls"][0],
            json!({"index": 1, "id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}})
        );
        assert_eq!(out[3]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out[4]["usage"]["total_tokens"], 26);
        assert_eq!(out[5], json!("[DONE]"));
    }

    #[test]
    fn an_error_in_the_stream_ends_it_with_an_error_event() {
        let body = concat!(
            "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}]}\n\n",
            "data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\"status\":\"UNAVAILABLE\"}}\n\n",
            "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"ignored\"}]},\"finishReason\":\"STOP\"}]}\n\n",
            "data: not even json\n\n",
        );
        let out = stream(true, body).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(out[2]["error"]["message"], "The model is overloaded.");
        assert_eq!(out[2]["error"]["code"], "bad_backend_output");
        assert_eq!(out[3], json!("[DONE]"));
    }

    #[test]
    fn a_blocked_prompt_streams_a_content_filter_finish() {
        let body = "data: {\"promptFeedback\":{\"blockReason\":\"PROHIBITED_CONTENT\"},\"usageMetadata\":{\"promptTokenCount\":4}}\n\n";
        let out = stream(false, body).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1]["choices"][0]["finish_reason"], "content_filter");
    }

    #[test]
    fn a_stream_without_a_finish_reason_ended_early() {
        let early = Err(Malformed::new("the backend's stream ended early"));
        let cut = STREAM.rsplit_once("data: ").unwrap().0;
        assert_eq!(stream(false, cut), early);
        assert_eq!(stream(false, ""), early);
        assert_eq!(stream(false, ": just a comment\n\n"), early);
    }

    #[test]
    fn malformed_events_are_malformed() {
        for body in [
            "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}]}\n\ndata: {oops\n\n",
            "data: [1,2]\n\n",
            "data: {\"candidates\":[{\"content\":{\"parts\":7}}]}\n\n",
        ] {
            assert!(stream(false, body).is_err(), "{body}");
        }
    }

    #[test]
    fn embeddings_go_as_a_batch_and_come_back_as_a_list() {
        let body = embed_request(
            &request(json!({"model": "embed", "input": ["What is the meaning of life?", "How much wood?"], "dimensions": 768})),
            "gemini-embedding-001",
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "What is the meaning of life?"}]}, "outputDimensionality": 768},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "How much wood?"}]}, "outputDimensionality": 768}
            ]})
        );
        let body =
            embed_request(&request(json!({"input": "x"})), "models/text-embedding-004").unwrap();
        assert_eq!(body["requests"][0]["model"], "models/text-embedding-004");
        assert!(body["requests"][0].get("outputDimensionality").is_none());
        assert!(embed_request(&request(json!({"input": [[1, 2]]})), "m").is_err());
        // The answer: the case fixtures/openai_to_gemini/answer-embed.
        for bad in [&b"{}"[..], b"{\"embeddings\":[{}]}", b"nope"] {
            assert!(embed_response(bad, &reply(false)).is_err());
        }
    }

    #[test]
    fn error_bodies_give_their_message() {
        let body = br#"{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT"}}"#;
        assert_eq!(
            error_message(body).as_deref(),
            Some("API key not valid. Please pass a valid API key.")
        );
        let listed = br#"[{"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}]"#;
        assert_eq!(error_message(listed).as_deref(), Some("Resource exhausted"));
        assert_eq!(error_message(b"{\"error\": \"plain\"}"), None);
        assert_eq!(error_message(b"<html>"), None);
    }
}
