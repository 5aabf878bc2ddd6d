//! Anthropic Messages as the CLIENT's protocol: Claude Code and the Anthropic SDKs send
//! `POST /v1/messages`, the backend speaks OpenAI chat completions. The request goes one way
//! (`to_chat_request`), the answer the other (`from_chat_response`, `MessageStream`), and errors
//! are re-wrapped in Anthropic's shape (`error_body`, `stream_error`) so the SDKs raise the error
//! class the status implies.
//!
//! Not translated: `document` blocks, images inside `tool_result`, image sources other than
//! base64 and url, and server tools (typed tools such as `web_search_…`, `mcp_servers`) are
//! refused; the `thinking` config and blocks, `cache_control` and `service_tier` are dropped.
//! The answer has no `thinking` blocks (a backend's `reasoning_content` is dropped), its usage
//! no cache counts, and `stop_sequence` is always null (OpenAI does not say which sequence
//! stopped it).

use super::frames::{Event, SseEvents};
use super::openai::{self, StreamChunk};
use super::{
    not_translated, parse_answer, Malformed, Object, Refusal, ReplyContext, StreamTranslator,
    Translator, Upstream,
};
use crate::endpoint::Endpoint;
use crate::json_text::{push_decimal, push_string};
use serde_json::{json, Value};

/// An Anthropic Messages client in front of an OpenAI-compatible backend.
pub struct MessagesToOpenAi;

impl Translator for MessagesToOpenAi {
    fn backend(&self) -> &'static str {
        "OpenAI"
    }

    fn request(&self, endpoint: Endpoint, request: &Object, model: &str) -> Result<Value, Refusal> {
        match endpoint {
            Endpoint::Messages => to_chat_request(request, model),
            other => Err(not_translated(other, self.backend())),
        }
    }

    fn upstream_path(&self, _: Endpoint, upstream: &Upstream<'_>, _stream: bool) -> String {
        upstream.chat_path.to_string()
    }

    fn answer(&self, _: Endpoint, body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
        from_chat_response(body, reply)
    }

    fn stream(&self, reply: ReplyContext) -> Box<dyn StreamTranslator> {
        Box::new(MessageStream::new(reply))
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        openai_error_message(body)
    }

    fn usage_in_backend_bytes(&self) -> bool {
        true
    }
}

/// How the texts of several blocks (system, tool results, assistant turns) are joined.
const JOIN: &str = "\n";
/// What `count_tokens` charges an image: about what a ~1.15 megapixel image costs, the size
/// Anthropic scales larger ones down to.
const IMAGE_TOKENS: u64 = 1_600;
/// What `count_tokens` adds per message for its role and framing.
const MESSAGE_TOKENS: u64 = 4;

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal::Invalid(why.into())
}

fn unsupported(why: impl Into<String>) -> Refusal {
    Refusal::Unsupported(why.into())
}

/// An Anthropic Messages request (parsed) → an OpenAI chat completions body. `model` is the
/// model to ask for.
pub fn to_chat_request(request: &Object, model: &str) -> Result<Value, Refusal> {
    let max_tokens = match request.get("max_tokens") {
        None | Some(Value::Null) => return Err(invalid("max_tokens: Field required")),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| invalid("max_tokens: Input should be a non-negative integer"))?,
    };
    let mut messages = Vec::new();
    if let Some(system) = request.get("system").filter(|s| !s.is_null()) {
        let text = system_text(system)?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let turns = match request.get("messages") {
        Some(Value::Array(turns)) if !turns.is_empty() => turns,
        Some(Value::Array(_)) => return Err(invalid("messages: at least one message is required")),
        None | Some(Value::Null) => return Err(invalid("messages: Field required")),
        Some(_) => return Err(invalid("messages: Input should be a valid list")),
    };
    for (at, turn) in turns.iter().enumerate() {
        push_turn(turn, at, &mut messages)?;
    }

    let mut body = Object::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), Value::Array(messages));
    body.insert("max_tokens".into(), max_tokens.into());
    if let Some(stop) = request.get("stop_sequences").filter(|s| !s.is_null()) {
        let list = stop
            .as_array()
            .filter(|l| l.iter().all(Value::is_string))
            .ok_or_else(|| invalid("stop_sequences: Input should be a list of strings"))?;
        if !list.is_empty() {
            body.insert("stop".into(), stop.clone());
        }
    }
    // OpenAI has no top_k (its own API refuses the field), but the OpenAI-compatible servers
    // this gateway fronts, vLLM and llama.cpp, honour it: it is passed on, not dropped.
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = request.get(key).filter(|v| !v.is_null()) {
            if !v.is_number() {
                return Err(invalid(format!("{key}: Input should be a valid number")));
            }
            body.insert(key.into(), v.clone());
        }
    }
    if let Some(user) = request
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        body.insert("user".into(), user.into());
    }
    if request
        .get("mcp_servers")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(unsupported(
            "mcp_servers: the backend cannot call MCP servers",
        ));
    }
    if let Some(tools) = chat_tools(request.get("tools"))? {
        body.insert("tools".into(), tools);
    }
    if let Some(choice) = request.get("tool_choice").filter(|c| !c.is_null()) {
        let (choice, parallel) = chat_tool_choice(choice)?;
        body.insert("tool_choice".into(), choice);
        if !parallel {
            body.insert("parallel_tool_calls".into(), false.into());
        }
    }
    if openai::is_stream(request) {
        body.insert("stream".into(), true.into());
        // Anthropic always reports usage at the end of a stream; OpenAI only when asked.
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(body))
}

/// The system prompt: a string, or the texts of a list of text blocks.
fn system_text(system: &Value) -> Result<String, Refusal> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (at, block) in blocks.iter().enumerate() {
                match (block_type(block), block.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => {
                        return Err(invalid(format!(
                            "system.{at}: Input should be a text block"
                        )))
                    }
                }
            }
            Ok(texts.join(JOIN))
        }
        _ => Err(invalid(
            "system: Input should be a string or a list of text blocks",
        )),
    }
}

fn block_type(block: &Value) -> Option<&str> {
    block.get("type").and_then(Value::as_str)
}

fn push_turn(turn: &Value, at: usize, out: &mut Vec<Value>) -> Result<(), Refusal> {
    let Some(turn) = turn.as_object() else {
        return Err(invalid(format!(
            "messages.{at}: Input should be a valid dictionary"
        )));
    };
    let Some(content) = turn.get("content") else {
        return Err(invalid(format!("messages.{at}.content: Field required")));
    };
    match turn.get("role").and_then(Value::as_str) {
        Some("user") => push_user(content, at, out),
        Some("assistant") => push_assistant(content, at, out),
        _ => Err(invalid(format!(
            "messages.{at}.role: Input should be 'user' or 'assistant'"
        ))),
    }
}

fn push_user(content: &Value, at: usize, out: &mut Vec<Value>) -> Result<(), Refusal> {
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => return Err(content_not_a_list(at)),
    };
    let mut parts = Vec::new();
    let mut tool_results = 0;
    for (i, block) in blocks.iter().enumerate() {
        let path = || format!("messages.{at}.content.{i}");
        match block_type(block) {
            Some("text") => parts.push(json!({"type": "text", "text": block_text(block, path)?})),
            Some("image") => parts.push(image_part(block, path)?),
            // OpenAI wants each result as a tool message right after the assistant's calls:
            // pushed now, they come before the user message built from the rest.
            Some("tool_result") => {
                out.push(tool_message(block, path)?);
                tool_results += 1;
            }
            Some("thinking" | "redacted_thinking") => {}
            Some("tool_use") => {
                return Err(invalid(format!(
                    "{}: tool_use blocks belong in assistant messages",
                    path()
                )))
            }
            other => return Err(block_not_translated(path(), other)),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    } else if tool_results == 0 {
        out.push(json!({"role": "user", "content": ""}));
    }
    Ok(())
}

fn push_assistant(content: &Value, at: usize, out: &mut Vec<Value>) -> Result<(), Refusal> {
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": "assistant", "content": s}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => return Err(content_not_a_list(at)),
    };
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let path = || format!("messages.{at}.content.{i}");
        match block_type(block) {
            Some("text") => texts.push(block_text(block, path)?),
            Some("tool_use") => calls.push(tool_call(block, path)?),
            Some("thinking" | "redacted_thinking") => {}
            Some("tool_result") => {
                return Err(invalid(format!(
                    "{}: tool_result blocks belong in user messages",
                    path()
                )))
            }
            other => return Err(block_not_translated(path(), other)),
        }
    }
    let text = texts.join(JOIN);
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        if let Some(m) = message.as_object_mut() {
            if text.is_empty() {
                m.insert("content".into(), Value::Null);
            }
            m.insert("tool_calls".into(), Value::Array(calls));
        }
    }
    out.push(message);
    Ok(())
}

fn content_not_a_list(at: usize) -> Refusal {
    invalid(format!(
        "messages.{at}.content: Input should be a string or a list of content blocks"
    ))
}

fn block_not_translated(path: String, kind: Option<&str>) -> Refusal {
    match kind {
        Some(kind) => unsupported(format!(
            "{path}: {kind} blocks cannot be sent to this backend"
        )),
        None => invalid(format!("{path}.type: Field required")),
    }
}

fn block_text(block: &Value, path: impl Fn() -> String) -> Result<&str, Refusal> {
    block
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{}.text: Input should be a valid string", path())))
}

fn required_str<'a>(
    block: &'a Value,
    key: &str,
    path: &impl Fn() -> String,
) -> Result<&'a str, Refusal> {
    block
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{}.{key}: Field required", path())))
}

fn image_part(block: &Value, path: impl Fn() -> String) -> Result<Value, Refusal> {
    let Some(source) = block.get("source") else {
        return Err(invalid(format!("{}.source: Field required", path())));
    };
    let url = match block_type(source) {
        Some("base64") => {
            let media = required_str(source, "media_type", &|| format!("{}.source", path()))?;
            let data = required_str(source, "data", &|| format!("{}.source", path()))?;
            format!("data:{media};base64,{data}")
        }
        Some("url") => required_str(source, "url", &|| format!("{}.source", path()))?.to_string(),
        Some(other) => {
            return Err(unsupported(format!(
                "{}.source: {other} image sources cannot be sent to this backend",
                path()
            )))
        }
        None => return Err(invalid(format!("{}.source.type: Field required", path()))),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tool_message(block: &Value, path: impl Fn() -> String) -> Result<Value, Refusal> {
    let id = required_str(block, "tool_use_id", &path)?;
    let text = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for (k, item) in items.iter().enumerate() {
                let item_path = || format!("{}.content.{k}", path());
                match block_type(item) {
                    Some("text") => texts.push(block_text(item, item_path)?),
                    other => return Err(block_not_translated(item_path(), other)),
                }
            }
            texts.join(JOIN)
        }
        Some(_) => {
            return Err(invalid(format!(
                "{}.content: Input should be a string or a list of content blocks",
                path()
            )))
        }
    };
    let text = if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        format!("Error: {text}")
    } else {
        text
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

fn tool_call(block: &Value, path: impl Fn() -> String) -> Result<Value, Refusal> {
    let id = required_str(block, "id", &path)?;
    let name = required_str(block, "name", &path)?;
    let arguments = match block.get("input") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(input) => input.to_string(),
    };
    Ok(json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
}

fn chat_tools(tools: Option<&Value>) -> Result<Option<Value>, Refusal> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(invalid("tools: Input should be a valid list")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (at, tool) in list.iter().enumerate() {
        // Client tools have no type (or "custom"); a typed tool runs on Anthropic's servers.
        match block_type(tool) {
            None | Some("custom") => {}
            Some(kind) => {
                return Err(unsupported(format!(
                    "tools.{at}: the server tool {kind} cannot run on this backend"
                )))
            }
        }
        let name = required_str(tool, "name", &|| format!("tools.{at}"))?;
        let mut function = json!({"name": name});
        if let Some(m) = function.as_object_mut() {
            if let Some(description) = tool.get("description").and_then(Value::as_str) {
                m.insert("description".into(), description.into());
            }
            if let Some(schema) = tool.get("input_schema").filter(|s| s.is_object()) {
                m.insert("parameters".into(), schema.clone());
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok((!out.is_empty()).then_some(Value::Array(out)))
}

/// The OpenAI `tool_choice`, and whether parallel tool calls stay allowed.
fn chat_tool_choice(choice: &Value) -> Result<(Value, bool), Refusal> {
    let openai = match block_type(choice) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = required_str(choice, "name", &|| "tool_choice".to_string())?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(invalid(
                "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
            ))
        }
    };
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        != Some(true);
    Ok((openai, parallel))
}

/// The Anthropic `stop_reason` for an OpenAI `finish_reason`. A backend that answers tool calls
/// with `stop` (some do) still means `tool_use`: that is what the clients loop on.
fn stop_reason(finish_reason: Option<&str>, called_tools: bool) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ if called_tools => "tool_use",
        _ => "end_turn",
    }
}

/// `msg_` and the completion's id without its `chatcmpl-` prefix; one from the timestamp when
/// the backend gave none.
fn message_id(id: Option<&str>, reply: &ReplyContext) -> String {
    match id.filter(|id| !id.is_empty()) {
        Some(id) => format!("msg_{}", id.strip_prefix("chatcmpl-").unwrap_or(id)),
        None => format!("msg_{}", reply.created),
    }
}

fn token_count(usage: Option<&Value>, key: &str) -> Option<u64> {
    usage?.get(key)?.as_u64()
}

/// An OpenAI chat.completion → an Anthropic Message (bytes of JSON).
pub fn from_chat_response(body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    let answer = parse_answer(body)?;
    let choice = answer
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| Malformed::new("the backend's answer has no choices"))?;
    let message = choice
        .get("message")
        .filter(|m| m.is_object())
        .ok_or_else(|| Malformed::new("the backend's answer has no message"))?;
    let mut content = Vec::new();
    let mut finish_reason = choice.get("finish_reason").and_then(Value::as_str);
    let text = message
        .get("content")
        .map(openai::content_text)
        .unwrap_or_default();
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    } else if let Some(refusal) = message
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
    {
        content.push(json!({"type": "text", "text": refusal}));
        finish_reason = Some("content_filter");
    }
    let calls = openai::tool_calls(message)?;
    for call in &calls {
        // Arguments the model got wrong are the client's to see as an empty input, not a 502.
        let input = call
            .arguments
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        content.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
    }
    let usage = answer.get("usage");
    let message = json!({
        "id": message_id(answer.get("id").and_then(Value::as_str), reply),
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop_reason(finish_reason, !calls.is_empty()),
        "stop_sequence": null,
        "usage": {
            "input_tokens": token_count(usage, "prompt_tokens").unwrap_or(0),
            "output_tokens": token_count(usage, "completion_tokens").unwrap_or(0),
        },
    });
    Ok(message.to_string().into_bytes())
}

/// Appends one Anthropic server-sent event.
fn emit(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    openai::sse_data(out, data);
}

fn error_json(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The Anthropic error `type` for an HTTP status.
pub fn error_type(status: u32) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        // 400 and the 4xx Anthropic does not list.
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// An Anthropic error body: `{"type":"error","error":{"type","message"}}`.
pub fn error_body(status: u32, message: &str) -> Vec<u8> {
    error_json(error_type(status), message)
        .to_string()
        .into_bytes()
}

/// An error inside a stream whose head has gone out (`event: error`): what the caller emits
/// when the translator returns `Err`, with 502 for the backend's bad output.
pub fn stream_error(out: &mut Vec<u8>, status: u32, message: &str) {
    emit(out, "error", &error_json(error_type(status), message));
}

/// The message of an OpenAI error body (`{"error":{"message"}}`, or `{"error":"…"}` as some
/// compatible servers send), to re-wrap a backend's error.
pub fn openai_error_message(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let error = body.get("error")?;
    error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .map(str::to_string)
}

/// A rough token count of a Messages request for `/v1/messages/count_tokens`
/// (`{"input_tokens": N}`): its texts, tool inputs and schemas estimated as the usage reader
/// estimates (CJK characters / 2, others / 4), a flat price per image, a little per message.
pub fn count_tokens(request: &Object) -> u64 {
    let mut chars = CharCount::default();
    let mut tokens = 0u64;
    for key in ["system", "tools"] {
        if let Some(v) = request.get(key) {
            tokens = tokens.saturating_add(chars.walk(v));
        }
    }
    if let Some(Value::Array(turns)) = request.get("messages") {
        for turn in turns {
            tokens = tokens
                .saturating_add(MESSAGE_TOKENS)
                .saturating_add(chars.walk(turn));
        }
    }
    tokens.saturating_add(chars.tokens())
}

#[derive(Default)]
struct CharCount {
    cjk: u64,
    other: u64,
}

impl CharCount {
    /// Counts the strings and keys of `value`; returns the tokens of the images it holds.
    /// Recursion is bounded by serde_json's nesting limit on what it parsed.
    fn walk(&mut self, value: &Value) -> u64 {
        match value {
            Value::String(s) => {
                self.text(s);
                0
            }
            Value::Array(items) => items
                .iter()
                .fold(0u64, |n, v| n.saturating_add(self.walk(v))),
            // The base64 payload is not text: an image costs by its size, not its bytes.
            Value::Object(_) if block_type(value) == Some("image") => IMAGE_TOKENS,
            Value::Object(map) => map.iter().fold(0u64, |n, (k, v)| {
                self.text(k);
                n.saturating_add(self.walk(v))
            }),
            Value::Number(_) | Value::Bool(_) => {
                self.other = self.other.saturating_add(4);
                0
            }
            Value::Null => 0,
        }
    }

    fn text(&mut self, s: &str) {
        for c in s.chars() {
            if crate::usage::is_cjk(u32::from(c)) {
                self.cjk = self.cjk.saturating_add(1);
            } else {
                self.other = self.other.saturating_add(1);
            }
        }
    }

    fn tokens(&self) -> u64 {
        self.cjk.div_ceil(2).saturating_add(self.other.div_ceil(4))
    }
}

/// What kind the open content block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool_use block fed by the OpenAI tool call of this index.
    Tool(u64),
}

/// OpenAI chunks (SSE `data:` lines, `[DONE]`) → the Anthropic event stream. Holds no text: a
/// delta goes out as soon as its event is whole; the state is a few counters and the id.
#[derive(Debug)]
pub struct MessageStream {
    reply: ReplyContext,
    sse: SseEvents,
    started: bool,
    /// The open content block and its index in the message.
    open: Option<(u64, Block)>,
    /// Blocks opened so far (the index the next one takes).
    blocks: u64,
    /// The highest OpenAI tool call index seen: a delta for an earlier one cannot be placed.
    last_call: Option<u64>,
    finish_reason: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// message_stop or an error went out (or the translation failed): nothing more is said.
    ended: bool,
}

impl MessageStream {
    pub fn new(reply: ReplyContext) -> MessageStream {
        MessageStream {
            reply,
            sse: SseEvents::new(),
            started: false,
            open: None,
            blocks: 0,
            last_call: None,
            finish_reason: None,
            input_tokens: None,
            output_tokens: None,
            ended: false,
        }
    }

    /// An `event: ping`, as Anthropic sends one after `message_start`. (Pings while a slow backend
    /// thinks would need a timer per stream, which proxy-wasm does not give a filter.)
    pub fn ping(&mut self, out: &mut Vec<u8>) {
        if !self.ended {
            emit(out, "ping", &json!({"type": "ping"}));
        }
    }

    fn on_event(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.ended {
            return Ok(());
        }
        let mut slot = Value::Null;
        let chunk = match openai::read_stream_chunk(&event.data, &mut slot)? {
            StreamChunk::Nothing => return Ok(()),
            StreamChunk::Done => {
                self.end(None, out);
                return Ok(());
            }
            StreamChunk::Error(message, status) => {
                self.ended = true;
                stream_error(out, status.unwrap_or(500), message);
                return Ok(());
            }
            StreamChunk::Chunk(chunk) => chunk,
        };
        self.start(chunk.get("id").and_then(Value::as_str), out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.input_tokens = token_count(Some(usage), "prompt_tokens").or(self.input_tokens);
            self.output_tokens =
                token_count(Some(usage), "completion_tokens").or(self.output_tokens);
        }
        let choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        // A Messages request asks for one answer: only choice 0 is read.
        for choice in choices
            .iter()
            .filter(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        {
            if let Some(delta) = choice.get("delta") {
                if let Some(text) = delta
                    .get("content")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                {
                    self.text(text, out);
                }
                if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                    for call in calls {
                        self.tool_call(call, out)?;
                    }
                }
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_string());
            }
        }
        Ok(())
    }

    fn start(&mut self, id: Option<&str>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        emit(
            out,
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": message_id(id, &self.reply),
                    "type": "message",
                    "role": "assistant",
                    "model": self.reply.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            }),
        );
        // Anthropic's streams carry a ping early on; clients expect (and skip) it.
        self.ping(out);
    }

    fn open_block(&mut self, block: Block, content_block: Value, out: &mut Vec<u8>) {
        self.close_block(out);
        let index = self.blocks;
        self.blocks = self.blocks.saturating_add(1);
        self.open = Some((index, block));
        emit(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": content_block}),
        );
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            emit(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// A `content_block_delta` of the open block: `{"type": kind, field: piece}`, as JSON text
    /// written directly (it is the event of every token).
    fn delta(&self, kind: &str, field: &str, piece: &str, out: &mut Vec<u8>) {
        let Some((index, _)) = self.open else {
            return;
        };
        let mut data = String::with_capacity(piece.len().saturating_add(96));
        data.push_str(r#"{"type":"content_block_delta","index":"#);
        push_decimal(&mut data, index);
        data.push_str(r#","delta":{"type":"#);
        push_string(&mut data, kind);
        data.push(',');
        push_string(&mut data, field);
        data.push(':');
        push_string(&mut data, piece);
        data.push_str("}}");
        out.extend_from_slice(b"event: content_block_delta\ndata: ");
        out.extend_from_slice(data.as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        if !matches!(self.open, Some((_, Block::Text))) {
            self.open_block(Block::Text, json!({"type": "text", "text": ""}), out);
        }
        self.delta("text_delta", "text", text, out);
    }

    fn tool_call(&mut self, call: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        if !matches!(self.open, Some((_, Block::Tool(open))) if open == index) {
            if self.last_call.is_some_and(|last| index <= last) {
                self.ended = true;
                return Err(Malformed::new(
                    "the backend's stream went back to an earlier tool call",
                ));
            }
            self.last_call = Some(index);
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| format!("call_{index}"), str::to_string);
            let name = function
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            self.open_block(
                Block::Tool(index),
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                out,
            );
        }
        if let Some(piece) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            self.delta("input_json_delta", "partial_json", piece, out);
        }
        Ok(())
    }

    /// Closes the message: the open block, the stop reason and usage, message_stop.
    fn end(&mut self, id: Option<&str>, out: &mut Vec<u8>) {
        self.start(id, out);
        self.close_block(out);
        let mut usage = json!({"output_tokens": self.output_tokens.unwrap_or(0)});
        if let (Some(input), Some(m)) = (self.input_tokens, usage.as_object_mut()) {
            m.insert("input_tokens".into(), input.into());
        }
        let reason = stop_reason(self.finish_reason.as_deref(), self.last_call.is_some());
        emit(
            out,
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": null},
                "usage": usage,
            }),
        );
        emit(out, "message_stop", &json!({"type": "message_stop"}));
        self.ended = true;
    }
}

impl StreamTranslator for MessageStream {
    /// Anthropic's `error` event (an `api_error`, as for a 502).
    fn fail(&mut self, why: &str, out: &mut Vec<u8>) {
        stream_error(out, 502, why);
    }

    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        let mut sse = std::mem::take(&mut self.sse);
        let result = sse.feed(chunk, &mut |event| self.on_event(event, out));
        self.sse = sse;
        if result.is_err() {
            self.ended = true;
        }
        result
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let mut sse = std::mem::take(&mut self.sse);
        let result = sse.finish(&mut |event| self.on_event(event, out));
        self.sse = sse;
        if result.is_err() {
            self.ended = true;
        }
        result?;
        if self.ended {
            return Ok(());
        }
        if self.finish_reason.is_none() {
            self.ended = true;
            return Err(Malformed::new(
                "the backend's stream ended before its answer did",
            ));
        }
        // A backend that stops after its finish_reason without `[DONE]` still said it all.
        self.end(None, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn reply() -> ReplyContext {
        ReplyContext {
            model: "claude-sonnet-4-5".into(),
            created: 1_700_000_000,
            include_usage: false,
            nonce: 0,
        }
    }

    fn request(body: Value) -> Result<Value, Refusal> {
        to_chat_request(body.as_object().unwrap(), "qwen3:8b")
    }

    fn message(body: Value) -> Value {
        let bytes = from_chat_response(body.to_string().as_bytes(), &reply()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_system_of_blocks_is_joined_and_cache_control_dropped() {
        let chat = request(json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": [
                {"type": "text", "text": "You are Claude Code."},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
            ]}],
        }))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "You are Claude Code.\nBe brief."},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ])
        );
    }

    // The vision examples of Anthropic's reference: a base64 image and a URL image.
    #[test]
    fn images_become_image_urls() {
        let chat = request(json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}},
                {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}},
                {"type": "text", "text": "Describe these images."},
            ]}],
        }))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
                {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"}},
                {"type": "text", "text": "Describe these images."},
            ]}])
        );
        let file = request(json!({
            "max_tokens": 1,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
            ]}],
        }));
        assert!(matches!(file, Err(Refusal::Unsupported(_))), "{file:?}");
    }

    #[test]
    fn tool_results_alone_make_no_user_message_and_errors_are_marked() {
        let chat = request(json!({
            "max_tokens": 10,
            "messages": [
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
                    {"type": "tool_use", "id": "t2", "name": "Read", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "no such dir", "is_error": true},
                    {"type": "tool_result", "tool_use_id": "t2"},
                ]},
            ],
        }))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "Bash", "arguments": "{\"command\":\"ls\"}"}},
                    {"id": "t2", "type": "function", "function": {"name": "Read", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "t1", "content": "Error: no such dir"},
                {"role": "tool", "tool_call_id": "t2", "content": ""},
            ])
        );
    }

    #[test]
    fn tool_choice_maps_each_kind() {
        let choice = |c: Value| {
            request(
                json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tool_choice": c}),
            )
        };
        assert_eq!(
            choice(json!({"type": "auto"})).unwrap()["tool_choice"],
            "auto"
        );
        assert_eq!(
            choice(json!({"type": "any"})).unwrap()["tool_choice"],
            "required"
        );
        assert_eq!(
            choice(json!({"type": "none"})).unwrap()["tool_choice"],
            "none"
        );
        let tool = choice(json!({"type": "tool", "name": "get_weather"})).unwrap();
        assert_eq!(
            tool["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        assert!(tool.get("parallel_tool_calls").is_none());
        assert!(matches!(
            choice(json!({"type": "maybe"})),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            choice(json!({"type": "tool"})),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn what_cannot_be_said_or_is_wrong_is_refused() {
        let refused = |body: Value| request(body).unwrap_err();
        let user = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            refused(json!({"messages": user})),
            Refusal::Invalid("max_tokens: Field required".into())
        );
        assert!(matches!(
            refused(json!({"max_tokens": -1, "messages": user})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": []})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": {}})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": ["hi"]})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": [{"role": "system", "content": "x"}]})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": [{"role": "user"}]})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": [{"role": "user", "content": 5}]})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": user, "system": 5})),
            Refusal::Invalid(_)
        ));
        assert!(matches!(
            refused(json!({"max_tokens": 1, "messages": user, "temperature": "hot"})),
            Refusal::Invalid(_)
        ));
        let document = json!({"max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
        ]}]});
        assert!(matches!(refused(document), Refusal::Unsupported(m) if m.contains("document")));
        let server_tool = json!({"max_tokens": 1, "messages": user,
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]});
        assert!(
            matches!(refused(server_tool), Refusal::Unsupported(m) if m.contains("web_search_20250305"))
        );
        let image_result = json!({"max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
            ]},
        ]}]});
        assert!(matches!(refused(image_result), Refusal::Unsupported(_)));
        let misplaced = json!({"max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}},
        ]}]});
        assert!(matches!(refused(misplaced), Refusal::Invalid(_)));
        let untyped =
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": [{"text": "x"}]}]});
        assert!(matches!(refused(untyped), Refusal::Invalid(_)));
        // A custom tool may say so.
        let custom = json!({"max_tokens": 1, "messages": user,
            "tools": [{"type": "custom", "name": "f", "input_schema": {"type": "object"}}]});
        assert_eq!(
            request(custom).unwrap()["tools"][0]["function"]["name"],
            "f"
        );
    }

    #[test]
    fn stop_reasons_map() {
        let reason = |finish: Value, calls: Value| {
            message(
                json!({"id": "x", "choices": [{"message": {"content": "a", "tool_calls": calls},
                "finish_reason": finish}]}),
            )["stop_reason"]
                .clone()
        };
        let call = json!([{"id": "c", "function": {"name": "f", "arguments": "{}"}}]);
        assert_eq!(reason(json!("stop"), Value::Null), "end_turn");
        assert_eq!(reason(json!("length"), Value::Null), "max_tokens");
        assert_eq!(reason(json!("tool_calls"), call.clone()), "tool_use");
        assert_eq!(reason(json!("content_filter"), Value::Null), "refusal");
        assert_eq!(reason(Value::Null, Value::Null), "end_turn");
        // A backend that stops a tool call with "stop".
        assert_eq!(reason(json!("stop"), call), "tool_use");
    }

    #[test]
    fn a_bare_answer_still_makes_a_whole_message() {
        let m = message(json!({"choices": [{"message": {"content": ""}}]}));
        assert_eq!(m["id"], "msg_1700000000");
        assert_eq!(m["content"], json!([]));
        assert_eq!(m["usage"], json!({"input_tokens": 0, "output_tokens": 0}));
        let refusal = message(
            json!({"id": "chatcmpl-r", "choices": [{"message": {"content": null,
            "refusal": "I can't help with that."}, "finish_reason": "stop"}]}),
        );
        assert_eq!(refusal["content"][0]["text"], "I can't help with that.");
        assert_eq!(refusal["stop_reason"], "refusal");
    }

    #[test]
    fn malformed_answers_are_errors() {
        for body in [
            &b"not json"[..],
            b"[1]",
            b"{}",
            b"{\"choices\":[]}",
            b"{\"choices\":[{}]}",
            b"{\"choices\":[{\"message\":\"hi\"}]}",
            b"{\"choices\":[{\"message\":{\"tool_calls\":{}}}]}",
            b"{\"choices\":[{\"message\":{\"tool_calls\":[{\"id\":\"c\"}]}}]}",
            b"{\"error\":{\"message\":\"boom\"}}",
        ] {
            assert!(from_chat_response(body, &reply()).is_err(), "{body:?}");
        }
    }

    /// Feeds the chunks, then finishes; the output and whether it failed.
    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Result<(), Malformed>) {
        let mut stream = MessageStream::new(reply());
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(e) = stream.feed(chunk, &mut out) {
                return (out, Err(e));
            }
        }
        let result = stream.finish(&mut out);
        (out, result)
    }

    /// The output under every cut of the stream in two, and byte by byte, is the whole's.
    fn run_any_chunking(stream: &str) -> (Vec<u8>, Result<(), Malformed>) {
        let bytes = stream.as_bytes();
        let whole = run(&[bytes]);
        for split in 0..=bytes.len() {
            let (a, b) = bytes.split_at(split);
            assert_eq!(run(&[a, b]), whole, "split at {split}");
        }
        let ones: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&ones), whole, "byte by byte");
        whole
    }

    /// The events of an Anthropic stream but its pings (one follows `message_start`: see
    /// `a_ping_follows_message_start`), each checked to be `event: <name>\ndata: <json>` with the
    /// name its `type` says.
    fn events(out: &[u8]) -> Vec<(String, Value)> {
        let mut all = all_events(out);
        all.retain(|(name, _)| name != "ping");
        all
    }

    #[test]
    fn a_ping_follows_message_start() {
        let mut stream = MessageStream::new(ReplyContext {
            model: "m".into(),
            created: 1,
            include_usage: false,
            nonce: 0,
        });
        let mut out = Vec::new();
        let chunk = r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        stream
            .feed(format!("{chunk}\n\n").as_bytes(), &mut out)
            .unwrap();
        let names: Vec<String> = all_events(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    }

    fn all_events(out: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
        text.split_terminator("\n\n")
            .map(|event| {
                let (name, data) = event.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    fn sse(chunks: &[Value]) -> String {
        chunks
            .iter()
            .map(|c| format!("data: {c}\n\n"))
            .collect::<String>()
            + "data: [DONE]\n\n"
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
               "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    fn start_event() -> (String, Value) {
        (
            "message_start".into(),
            json!({"type": "message_start", "message": {
                "id": "msg_123", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        )
    }

    fn ev(name: &str, data: Value) -> (String, Value) {
        (name.to_string(), data)
    }

    // OpenAI's streaming example, with the usage chunk include_usage adds.
    #[test]
    fn a_text_stream_translates_the_same_under_any_chunking() {
        // The events: the case fixtures/messages_to_openai/stream-text.
        let stream = include_str!("fixtures/messages_to_openai/stream-text.in.sse");
        let (out, result) = run_any_chunking(stream);
        result.unwrap();
        assert!(out.starts_with(b"event: message_start\ndata: {"));
    }

    // OpenAI's documented tool call deltas (id and name first, then argument pieces), after
    // some text, with a second, parallel call.
    #[test]
    fn a_tool_call_stream_becomes_tool_use_blocks_under_any_chunking() {
        let call = |index: u64, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut function = json!({"arguments": args});
            let mut call = json!({"index": index});
            if let Some(name) = name {
                function["name"] = name.into();
            }
            if let Some(id) = id {
                call["id"] = id.into();
                call["type"] = "function".into();
            }
            call["function"] = function;
            chunk(json!({"tool_calls": [call]}), Value::Null)
        };
        let stream = sse(&[
            chunk(
                json!({"role": "assistant", "content": "Let me look."}),
                Value::Null,
            ),
            call(
                0,
                Some("call_DdmO9pD3xa9XTPNJ32zg2hcA"),
                Some("get_current_weather"),
                "",
            ),
            call(0, None, None, "{\""),
            call(0, None, None, "location"),
            call(0, None, None, "\": \"Boston, MA\"}"),
            call(1, Some("call_2"), Some("get_time"), "{}"),
            chunk(json!({}), json!("tool_calls")),
        ]);
        let (out, result) = run_any_chunking(&stream);
        result.unwrap();
        let delta = |index: u64, piece: &str| {
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece}}),
            )
        };
        assert_eq!(
            events(&out),
            vec![
                start_event(),
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
                ),
                ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}})
                ),
                ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0})
                ),
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 1, "content_block":
                    {"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "name": "get_current_weather", "input": {}}})
                ),
                delta(1, "{\""),
                delta(1, "location"),
                delta(1, "\": \"Boston, MA\"}"),
                ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 1})
                ),
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 2, "content_block":
                    {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}})
                ),
                delta(2, "{}"),
                ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 2})
                ),
                ev(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                    "usage": {"output_tokens": 0}})
                ),
                ev("message_stop", json!({"type": "message_stop"})),
            ]
        );
    }

    #[test]
    fn several_calls_in_one_chunk_and_a_return_to_an_earlier_one() {
        let both = sse(&[chunk(
            json!({"tool_calls": [
                {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}},
                {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}},
            ]}),
            json!("tool_calls"),
        )]);
        let (out, result) = run(&[both.as_bytes()]);
        result.unwrap();
        let starts: Vec<Value> = events(&out)
            .into_iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, d)| d["content_block"]["id"].clone())
            .collect();
        assert_eq!(starts, vec![json!("a"), json!("b")]);
        let back = sse(&[
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g"}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                Value::Null,
            ),
        ]);
        assert!(run(&[back.as_bytes()]).1.is_err());
    }

    #[test]
    fn an_error_chunk_becomes_an_error_event_and_ends_the_stream() {
        let stream = format!(
            "data: {}\n\ndata: {}\n\ndata: {}\n\n",
            chunk(json!({"content": "Hel"}), Value::Null),
            json!({"error": {"object": "error", "message": "The model is overloaded", "type": "ServiceUnavailableError", "code": 503}}),
            chunk(json!({"content": "lo"}), json!("stop")),
        );
        let (out, result) = run_any_chunking(&stream);
        result.unwrap();
        let seen = events(&out);
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(
            seen[3],
            ev(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "The model is overloaded"}})
            )
        );
        let (out, _) =
            run(&[b"data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n"]);
        assert_eq!(
            events(&out),
            vec![ev(
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": "boom"}})
            )]
        );
    }

    #[test]
    fn a_stream_that_ends_early_is_an_error_and_one_without_done_is_not() {
        let early = format!(
            "data: {}\n\n",
            chunk(json!({"content": "Hel"}), Value::Null)
        );
        let (out, result) = run_any_chunking(&early);
        assert!(result.is_err());
        assert_eq!(events(&out).len(), 3);
        let (_, result) = run(&[]);
        assert!(result.is_err());
        // A finish_reason, then the connection closes (the last event without its blank line).
        let no_done = format!(
            "data: {}\n\ndata: {}",
            chunk(json!({"content": "Hi"}), Value::Null),
            chunk(json!({}), json!("length")),
        );
        let (out, result) = run_any_chunking(&no_done);
        result.unwrap();
        let seen = events(&out);
        assert_eq!(seen[4].1["delta"]["stop_reason"], "max_tokens");
        assert_eq!(seen[5].0, "message_stop");
        // [DONE] alone still makes a whole, empty message.
        let (out, result) = run(&[b"data: [DONE]\n\n"]);
        result.unwrap();
        let names: Vec<String> = events(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["message_start", "message_delta", "message_stop"]);
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for stream in [
            &b"data: {\"choices\":\n\n"[..],
            b"data: [1]\n\n",
            b"data: nope\n\n",
        ] {
            let (_, result) = run(&[stream]);
            assert!(result.is_err(), "{stream:?}");
        }
        // Once failed, it says nothing more.
        let mut s = MessageStream::new(reply());
        let mut out = Vec::new();
        assert!(s.feed(b"data: nope\n\n", &mut out).is_err());
        s.feed(b"data: [DONE]\n\n", &mut out).unwrap();
        s.finish(&mut out).unwrap();
        s.ping(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn comments_blank_data_and_pings_are_harmless() {
        let mut s = MessageStream::new(reply());
        let mut out = Vec::new();
        s.ping(&mut out);
        assert_eq!(out, b"event: ping\ndata: {\"type\":\"ping\"}\n\n");
        out.clear();
        let stream = format!(
            ": keep-alive\n\ndata:\n\ndata: {}\r\n\r\ndata: [DONE]\n\n",
            chunk(json!({"content": "x"}), json!("stop"))
        );
        s.feed(stream.as_bytes(), &mut out).unwrap();
        s.finish(&mut out).unwrap();
        assert_eq!(events(&out).len(), 6);
    }

    #[test]
    fn error_types_follow_anthropics_table() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (409, "invalid_request_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "api_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(error_type(status), kind, "{status}");
        }
        let body: Value = serde_json::from_slice(&error_body(529, "Overloaded")).unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        let mut out = Vec::new();
        stream_error(&mut out, 502, "bad output");
        assert_eq!(
            events(&out),
            vec![ev(
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": "bad output"}})
            )]
        );
    }

    #[test]
    fn openai_error_messages_are_read() {
        let openai = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert_eq!(
            openai_error_message(openai).as_deref(),
            Some("Incorrect API key provided")
        );
        assert_eq!(
            openai_error_message(br#"{"error":"model not found"}"#).as_deref(),
            Some("model not found")
        );
        assert_eq!(openai_error_message(b"{\"detail\":\"x\"}"), None);
        assert_eq!(openai_error_message(b"<html>"), None);
    }

    #[test]
    fn count_tokens_grows_with_content() {
        let count = |body: Value| count_tokens(body.as_object().unwrap());
        let short = count(json!({"messages": [{"role": "user", "content": "Hello"}]}));
        let long = count(json!({"messages": [{"role": "user", "content": "Hello ".repeat(100)}]}));
        let system = count(json!({"system": "You are terse. ".repeat(20),
            "messages": [{"role": "user", "content": "Hello"}]}));
        let tools = count(json!({"messages": [{"role": "user", "content": "Hello"}],
            "tools": [{"name": "get_weather", "description": "Get the current weather in a given location",
                       "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}]}));
        let image = |data: String| {
            count(json!({"messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                {"type": "text", "text": "Hello"}]}]}))
        };
        let two = count(json!({"messages": [{"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hello"}]}));
        assert!(short > 0);
        assert!(long > short + 100, "{long} vs {short}");
        assert!(system > short + 50);
        assert!(tools > short + 10);
        assert!(image("AAAA".into()) > short + IMAGE_TOKENS);
        assert_eq!(
            image("A".repeat(100_000)),
            image("AAAA".into()),
            "an image costs the same whatever its bytes"
        );
        assert!(two > short);
        let cjk = count(json!({"messages": [{"role": "user", "content": "你好".repeat(50)}]}));
        let latin = count(json!({"messages": [{"role": "user", "content": "ab".repeat(50)}]}));
        assert!(cjk > latin);
        assert_eq!(count(json!({})), 0);
    }
}
