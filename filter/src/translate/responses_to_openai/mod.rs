//! OpenAI's Responses API as the CLIENT's protocol: Codex CLI, the OpenAI Agents SDK and the
//! OpenAI SDKs' `responses.create` send `POST /v1/responses`; the backend speaks OpenAI chat
//! completions. The request goes one way (`to_chat_request`), the answer the other
//! (`from_chat_response`; a stream through [`stream::ResponseStream`]). Errors keep OpenAI's
//! shape, which the Responses API shares.
//!
//! The translation is stateless: `previous_response_id`, `conversation`, `item_reference` items
//! and stored `prompt` templates would need a store of past responses, so they are refused (a
//! 400 that says to send the whole conversation in `input`), as is `background: true`. `store`
//! is accepted, and every answer says `store: false`: nothing was stored. Other refusals (400s
//! naming what): tools other than `function` tools, input items other than messages, function
//! calls, their outputs and reasoning, input files and images by `file_id`, and any field this
//! module does not know.
//!
//! Dropped, because ignoring them changes nothing the client relies on: `reasoning` input items
//! (a chat backend cannot take them back), `reasoning.summary`, `text.verbosity`, and the
//! fields in `DROPPED` (`truncation`, `service_tier`, `prompt_cache_key`,
//! `prompt_cache_retention`, `safety_identifier`, `include`, `stream_options`, `top_logprobs`,
//! `client_metadata`). A field sent as `null` counts as absent.
//!
//! The answer is built from the chat answer alone: it does not echo the request's `tools`,
//! `tool_choice`, `instructions` or sampling (the SDKs parse their defaults: `[]`, `"auto"`,
//! null), and has no `reasoning` items (a backend's `reasoning_content` is dropped). A chat
//! `refusal` is the message's text, the Response `incomplete` for `content_filter`.

pub mod stream;

use super::openai;
use super::{
    parse_answer, Malformed, Object, Refusal, ReplyContext, StreamTranslator, Translator, Upstream,
};
use crate::endpoint::Endpoint;
use serde_json::{json, Value};

/// A Responses API client in front of an OpenAI chat-completions backend.
pub struct ResponsesToOpenAi;

impl Translator for ResponsesToOpenAi {
    fn backend(&self) -> &'static str {
        "OpenAI chat completions"
    }

    // Every call is a Responses request: the dispatch sends nothing else here.
    fn request(&self, _: Endpoint, request: &Object, model: &str) -> Result<Value, Refusal> {
        to_chat_request(request, model)
    }

    fn upstream_path(&self, _: Endpoint, upstream: &Upstream<'_>, _stream: bool) -> String {
        upstream.chat_path.to_string()
    }

    fn answer(&self, _: Endpoint, body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
        from_chat_response(body, reply)
    }

    fn stream(&self, reply: ReplyContext) -> Box<dyn StreamTranslator> {
        Box::new(stream::ResponseStream::new(reply))
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        super::messages_to_openai::openai_error_message(body)
    }

    /// The backend's chat bytes: the translated stream repeats its text (each delta, then the
    /// item's `.done` events and `response.completed`), which would count it four times.
    fn usage_in_backend_bytes(&self) -> bool {
        true
    }
}

/// Fields dropped without a word: hints and options of OpenAI's own service that a chat
/// backend has no use for, and whose absence changes nothing the client reads.
const DROPPED: &[&str] = &[
    "truncation",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "include",
    "stream_options",
    "top_logprobs",
    "client_metadata",
];

/// Fields translated (or, for `store`, accepted and answered with `store: false`).
const TRANSLATED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "reasoning",
    "user",
    "metadata",
    "stream",
    "store",
    "background",
];

const STATELESS: &str = "this gateway translates Responses to chat completions statelessly and \
                         cannot continue a stored response: send the whole conversation in `input`";

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal::Invalid(why.into())
}

/// A Responses request (parsed) → an OpenAI chat completions body for `model`.
pub fn to_chat_request(request: &Object, model: &str) -> Result<Value, Refusal> {
    refuse_what_cannot_be_honoured(request)?;
    let mut body = Object::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), Value::Array(chat_messages(request)?));
    // `max_tokens`, not `max_completion_tokens`: vLLM, Ollama, llama.cpp, SGLang and the older
    // OpenAI-compatible servers all take it; some know no `max_completion_tokens` at all.
    if let Some(limit) = openai::number(request, "max_output_tokens")? {
        body.insert("max_tokens".into(), limit);
    }
    for key in ["temperature", "top_p"] {
        if let Some(value) = openai::number(request, key)? {
            body.insert(key.into(), value);
        }
    }
    if let Some(user) = present(request, "user") {
        let user = user
            .as_str()
            .ok_or_else(|| invalid("`user` must be a string"))?;
        body.insert("user".into(), user.into());
    }
    if let Some(metadata) = present(request, "metadata") {
        if !metadata.is_object() {
            return Err(invalid("`metadata` must be an object"));
        }
        body.insert("metadata".into(), metadata.clone());
    }
    if let Some(effort) = present(request, "reasoning").and_then(|r| r.get("effort")) {
        if !effort.is_null() {
            let effort = effort
                .as_str()
                .ok_or_else(|| invalid("`reasoning.effort` must be a string"))?;
            body.insert("reasoning_effort".into(), effort.into());
        }
    }
    if let Some(format) = response_format(request)? {
        body.insert("response_format".into(), format);
    }
    tool_fields(request, &mut body)?;
    if openai::is_stream(request) {
        body.insert("stream".into(), true.into());
        // Always: the gateway settles token budgets and metrics from the usage chunk.
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(body))
}

/// A field that is there and not `null`.
fn present<'a>(request: &'a Object, key: &str) -> Option<&'a Value> {
    request.get(key).filter(|v| !v.is_null())
}

/// Refuses what a stateless translation cannot do and the fields it does not know, rather
/// than answering as if it had.
fn refuse_what_cannot_be_honoured(request: &Object) -> Result<(), Refusal> {
    for (key, value) in request {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "previous_response_id" | "conversation" => {
                return Err(invalid(format!("`{key}`: {STATELESS}")))
            }
            "prompt" => {
                return Err(invalid(
                    "`prompt`: stored prompt templates cannot be used through this gateway: \
                     send `instructions` and `input`",
                ))
            }
            "background" if value.as_bool() == Some(true) => {
                return Err(invalid(
                    "`background: true` is not supported: this gateway answers while the \
                     request is open",
                ))
            }
            known if TRANSLATED.contains(&known) || DROPPED.contains(&known) => {}
            other => {
                return Err(invalid(format!(
                    "`{other}` is not supported by this gateway's translation to chat completions"
                )))
            }
        }
    }
    Ok(())
}

/// `instructions` as the first system message, then `input`: a string (one user message) or
/// a list of items.
fn chat_messages(request: &Object) -> Result<Vec<Value>, Refusal> {
    let mut messages = Vec::new();
    match present(request, "instructions") {
        None => {}
        Some(Value::String(text)) if text.is_empty() => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(_) => return Err(invalid("`instructions` must be a string")),
    }
    match present(request, "input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (at, item) in items.iter().enumerate() {
                push_item(item, &format!("input[{at}]"), &mut messages)?;
            }
        }
        None => return Err(invalid("`input` is required")),
        Some(_) => return Err(invalid("`input` must be a string or a list of items")),
    }
    if messages.is_empty() {
        return Err(invalid("`input` must not be empty"));
    }
    Ok(messages)
}

fn kind(value: &Value) -> Option<&str> {
    value.get("type").and_then(Value::as_str)
}

fn required_str<'a>(value: &'a Value, key: &str, path: &str) -> Result<&'a str, Refusal> {
    value
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{path}.{key}: a string is required")))
}

/// One input item as chat messages. A message may leave out its `type`.
fn push_item(item: &Value, path: &str, out: &mut Vec<Value>) -> Result<(), Refusal> {
    if !item.is_object() {
        return Err(invalid(format!("{path}: an item must be an object")));
    }
    match kind(item) {
        None | Some("message") => out.push(chat_message(item, path)?),
        Some("function_call") => push_function_call(item, path, out)?,
        Some("function_call_output") => out.push(tool_message(item, path)?),
        // The backend's own reasoning of an earlier turn: a chat backend cannot take it back.
        Some("reasoning") => {}
        Some("item_reference") => {
            return Err(invalid(format!("{path}: item references: {STATELESS}")))
        }
        Some(other) => {
            return Err(invalid(format!(
                "{path}: items of type {other} are not supported by a chat-completions backend"
            )))
        }
    }
    Ok(())
}

/// A `message` item: `developer` speaks as `system`; content a string or a list of parts.
fn chat_message(item: &Value, path: &str) -> Result<Value, Refusal> {
    let role = match item.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        _ => {
            return Err(invalid(format!(
                "{path}.role: must be one of system, developer, user, assistant"
            )))
        }
    };
    let content = match item.get("content") {
        Some(Value::String(text)) => Value::String(text.clone()),
        Some(Value::Array(parts)) if role == "user" => user_parts(parts, path)?,
        Some(Value::Array(parts)) => Value::String(parts_text(parts, &format!("{path}.content"))?),
        _ => {
            return Err(invalid(format!(
                "{path}.content: must be a string or a list of content parts"
            )))
        }
    };
    Ok(json!({"role": role, "content": content}))
}

/// A user message's parts as chat parts: text and images.
fn user_parts(parts: &[Value], path: &str) -> Result<Value, Refusal> {
    let mut out = Vec::with_capacity(parts.len());
    for (at, part) in parts.iter().enumerate() {
        let path = format!("{path}.content[{at}]");
        match kind(part) {
            Some("input_text" | "output_text") => {
                let text = required_str(part, "text", &path)?;
                out.push(json!({"type": "text", "text": text}));
            }
            Some("input_image") => out.push(image_part(part, &path)?),
            other => return Err(part_not_translated(&path, other)),
        }
    }
    Ok(Value::Array(out))
}

/// The joined text of parts where chat takes text only (system and assistant messages,
/// function call outputs).
fn parts_text(parts: &[Value], path: &str) -> Result<String, Refusal> {
    let mut text = String::new();
    for (at, part) in parts.iter().enumerate() {
        let path = format!("{path}[{at}]");
        match kind(part) {
            Some("input_text" | "output_text") => text.push_str(required_str(part, "text", &path)?),
            Some("refusal") => text.push_str(required_str(part, "refusal", &path)?),
            other => return Err(part_not_translated(&path, other)),
        }
    }
    Ok(text)
}

fn part_not_translated(path: &str, kind: Option<&str>) -> Refusal {
    match kind {
        Some(kind) => invalid(format!(
            "{path}: content parts of type {kind} are not supported here by a chat-completions \
             backend"
        )),
        None => invalid(format!("{path}.type: a content part needs a type")),
    }
}

/// An `input_image` part: its URL (http(s) or data:) as chat's `image_url`.
fn image_part(part: &Value, path: &str) -> Result<Value, Refusal> {
    let Some(url) = part.get("image_url").and_then(Value::as_str) else {
        if part.get("file_id").is_some_and(|f| !f.is_null()) {
            return Err(invalid(format!(
                "{path}: images by file_id cannot be sent to a chat-completions backend: send \
                 the image as image_url (a URL or a data: URL)"
            )));
        }
        return Err(invalid(format!("{path}.image_url: a string is required")));
    };
    let mut image = json!({"url": url});
    if let (Some(detail), Some(map)) = (
        part.get("detail").and_then(Value::as_str),
        image.as_object_mut(),
    ) {
        map.insert("detail".into(), detail.into());
    }
    Ok(json!({"type": "image_url", "image_url": image}))
}

/// A `function_call` item: a tool call of the assistant message just before it (consecutive
/// calls are one assistant turn in chat), or of a new one.
fn push_function_call(item: &Value, path: &str, out: &mut Vec<Value>) -> Result<(), Refusal> {
    let call_id = required_str(item, "call_id", path)?;
    let name = required_str(item, "name", path)?;
    let arguments = required_str(item, "arguments", path)?;
    let call = json!({
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    });
    let last = out
        .last_mut()
        .and_then(Value::as_object_mut)
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    match last {
        Some(message) => match message.get_mut("tool_calls").and_then(Value::as_array_mut) {
            Some(calls) => calls.push(call),
            None => {
                message.insert("tool_calls".into(), json!([call]));
            }
        },
        None => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
    }
    Ok(())
}

/// A `function_call_output` item: the tool message answering its call.
fn tool_message(item: &Value, path: &str) -> Result<Value, Refusal> {
    let call_id = required_str(item, "call_id", path)?;
    let output = match item.get("output") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts_text(parts, &format!("{path}.output"))?,
        _ => {
            return Err(invalid(format!(
                "{path}.output: must be a string or a list of content parts"
            )))
        }
    };
    Ok(json!({"role": "tool", "tool_call_id": call_id, "content": output}))
}

/// `tools` (function tools only), `tool_choice` and `parallel_tool_calls`.
fn tool_fields(request: &Object, body: &mut Object) -> Result<(), Refusal> {
    match present(request, "tools") {
        None => {}
        Some(Value::Array(tools)) => {
            let tools = tools
                .iter()
                .enumerate()
                .map(|(at, tool)| chat_tool(tool, at))
                .collect::<Result<Vec<_>, _>>()?;
            if !tools.is_empty() {
                body.insert("tools".into(), Value::Array(tools));
            }
        }
        Some(_) => return Err(invalid("`tools` must be a list")),
    }
    if let Some(choice) = present(request, "tool_choice") {
        body.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    if let Some(parallel) = present(request, "parallel_tool_calls") {
        let parallel = parallel
            .as_bool()
            .ok_or_else(|| invalid("`parallel_tool_calls` must be a boolean"))?;
        body.insert("parallel_tool_calls".into(), parallel.into());
    }
    Ok(())
}

/// A function tool, from Responses' flat shape to chat's nested one.
fn chat_tool(tool: &Value, at: usize) -> Result<Value, Refusal> {
    let path = format!("tools[{at}]");
    match kind(tool) {
        Some("function") => {}
        Some(other) => {
            return Err(invalid(format!(
                "{path}: tool type {other} is not supported by a chat-completions backend"
            )))
        }
        None => return Err(invalid(format!("{path}.type: a tool needs a type"))),
    }
    let mut function = Object::new();
    function.insert("name".into(), required_str(tool, "name", &path)?.into());
    for key in ["description", "parameters", "strict"] {
        if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
            function.insert(key.into(), value.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, Refusal> {
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(_) if kind(choice) == Some("function") => {
            let name = required_str(choice, "name", "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        Value::Object(_) => Err(invalid(format!(
            "tool_choice: choosing a tool of type {} is not supported by a chat-completions \
             backend",
            kind(choice).unwrap_or("(none)")
        ))),
        _ => Err(invalid(
            "tool_choice: must be \"auto\", \"none\", \"required\" or a function",
        )),
    }
}

/// `text.format` as chat's `response_format` (`text`, the default, is none).
fn response_format(request: &Object) -> Result<Option<Value>, Refusal> {
    let Some(format) = present(request, "text").and_then(|t| t.get("format")) else {
        return Ok(None);
    };
    match kind(format) {
        None if format.is_null() => Ok(None),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Object::new();
            schema.insert(
                "name".into(),
                required_str(format, "name", "text.format")?.into(),
            );
            for key in ["schema", "strict", "description"] {
                if let Some(value) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), value.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid(
            "text.format.type: must be text, json_object or json_schema",
        )),
    }
}

/// Where a Response stands, as its `status` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    InProgress,
    Completed,
    /// Cut short: `incomplete_details.reason` says why (`max_output_tokens`, `content_filter`).
    Incomplete(&'static str),
    /// Broke off (a stream whose backend failed): `error` says why.
    Failed,
}

impl Status {
    /// The status of an answer that ended with the chat `finish_reason`.
    pub fn of_finish(finish_reason: Option<&str>) -> Status {
        match finish_reason {
            Some("length") => Status::Incomplete("max_output_tokens"),
            Some("content_filter") => Status::Incomplete("content_filter"),
            _ => Status::Completed,
        }
    }

    /// The Response's `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Failed => "failed",
            other => other.item_status(),
        }
    }

    /// The status of an output item of an answer in this state.
    pub fn item_status(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete(_) | Status::Failed => "incomplete",
        }
    }
}

/// The Response object (what a whole answer is, and what `response.created`,
/// `response.in_progress`, `response.completed` and `response.failed` events carry): its
/// `output` items, its `usage` (a Responses usage object, or `null`) and, when it failed, why.
/// The fields the SDKs require are all there; those of the request it does not know are their
/// defaults.
pub(super) fn response_object(
    reply: &ReplyContext,
    status: Status,
    output: Vec<Value>,
    usage: Value,
    error: Option<&str>,
) -> Value {
    let incomplete_details = match status {
        Status::Incomplete(reason) => json!({"reason": reason}),
        Status::InProgress | Status::Completed | Status::Failed => Value::Null,
    };
    let error = error.map_or(
        Value::Null,
        |message| json!({"code": "server_error", "message": message}),
    );
    json!({
        "id": ResponseIds::new(reply).response(),
        "object": "response",
        "created_at": reply.created,
        "status": status.as_str(),
        "background": false,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": null,
        "max_output_tokens": null,
        "metadata": {},
        "model": reply.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "store": false,
        "temperature": null,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": null,
        "truncation": "disabled",
        "usage": usage,
    })
}

/// A `message` item of the answer holding `text` (one `output_text` part); `status` is the
/// item's (`in_progress`, `completed`, `incomplete`).
pub(super) fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [output_text_part(text)],
    })
}

/// The `output_text` part of a message item.
pub(super) fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A `function_call` item of the answer; `call_id` is the backend's tool call id.
pub(super) fn function_call_item(
    id: &str,
    call_id: &str,
    name: &str,
    arguments: &str,
    status: &str,
) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// The counts of a Responses `usage` object, read from a chat `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ResponseUsage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
    pub reasoning: u64,
    pub total: u64,
}

impl ResponseUsage {
    /// The counts of a chat `usage` object (0 for what it leaves out).
    pub fn of_chat(chat_usage: &Value) -> ResponseUsage {
        let count = |path: &str| chat_usage.pointer(path).and_then(Value::as_u64);
        let input = count("/prompt_tokens").unwrap_or(0);
        let output = count("/completion_tokens").unwrap_or(0);
        ResponseUsage {
            input,
            output,
            cached: count("/prompt_tokens_details/cached_tokens").unwrap_or(0),
            reasoning: count("/completion_tokens_details/reasoning_tokens").unwrap_or(0),
            total: count("/total_tokens").unwrap_or(input.saturating_add(output)),
        }
    }

    /// The Responses `usage` object, with the cache and reasoning details the SDKs require.
    pub fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input,
            "input_tokens_details": {
                "cached_tokens": self.cached,
                // Chat usage does not say what was written to a cache.
                "cache_write_tokens": 0,
            },
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.total,
        })
    }
}

/// An OpenAI chat.completion → a Response object (bytes of JSON).
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
    let mut finish_reason = choice.get("finish_reason").and_then(Value::as_str);
    let mut text = message
        .get("content")
        .map(openai::content_text)
        .unwrap_or_default();
    if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
        if text.is_empty() && !refusal.is_empty() {
            text = refusal.to_string();
            finish_reason = Some("content_filter");
        }
    }
    let status = Status::of_finish(finish_reason);
    let ids = ResponseIds::new(reply);
    let mut output = Vec::new();
    if !text.is_empty() {
        output.push(message_item(&ids.message(), &text, status.item_status()));
    }
    output.extend(function_call_items(message, ids)?);
    let usage = answer
        .get("usage")
        .filter(|u| u.is_object())
        .map_or(Value::Null, |u| ResponseUsage::of_chat(u).to_json());
    Ok(response_object(reply, status, output, usage, None)
        .to_string()
        .into_bytes())
}

/// The chat message's tool calls as `function_call` items.
fn function_call_items(message: &Value, ids: ResponseIds) -> Result<Vec<Value>, Malformed> {
    let calls = openai::tool_calls(message)?;
    Ok((0u64..)
        .zip(&calls)
        .map(|(index, call)| {
            function_call_item(
                &ids.function_call(index),
                &call.id,
                call.name,
                call.arguments.unwrap_or("{}"),
                Status::Completed.item_status(),
            )
        })
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn reply(nonce: u64) -> ReplyContext {
        ReplyContext {
            model: "gpt-4.1".into(),
            created: 1_700_000_000,
            include_usage: false,
            nonce,
        }
    }

    fn request(body: Value) -> Result<Value, Refusal> {
        let translator: &dyn Translator = &ResponsesToOpenAi;
        translator.request(
            Endpoint::ChatCompletions,
            body.as_object().unwrap(),
            "qwen3:8b",
        )
    }

    fn refusal(body: Value) -> String {
        match request(body) {
            Err(Refusal::Invalid(why)) => why,
            other => panic!("not refused as invalid: {other:?}"),
        }
    }

    fn answer(body: Value, nonce: u64) -> Result<Value, Malformed> {
        let bytes = from_chat_response(body.to_string().as_bytes(), &reply(nonce))?;
        Ok(serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn state_it_cannot_keep_is_refused_saying_so() {
        for field in ["previous_response_id", "conversation"] {
            let why = refusal(json!({"model": "m", "input": "hi", field: "resp_123"}));
            assert!(why.contains(field), "{why}");
            assert!(
                why.contains("send the whole conversation in `input`"),
                "{why}"
            );
        }
        let why =
            refusal(json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}));
        assert!(why.starts_with("input[0]: item references"), "{why}");
        assert!(
            refusal(json!({"model": "m", "input": "hi", "background": true}))
                .contains("background")
        );
        assert!(
            refusal(json!({"model": "m", "input": "hi", "prompt": {"id": "pmpt_1"}}))
                .contains("prompt")
        );
        // Sent as null or false, they ask for nothing.
        let chat = request(json!({
            "model": "m", "input": "hi", "previous_response_id": null, "conversation": null,
            "background": false, "store": true,
        }));
        assert!(chat.is_ok(), "{chat:?}");
    }

    #[test]
    fn tools_other_than_functions_are_refused_naming_their_type() {
        let why = refusal(json!({
            "model": "m",
            "input": "hi",
            "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}],
        }));
        assert_eq!(
            why,
            "tools[1]: tool type web_search is not supported by a chat-completions backend"
        );
        let why =
            refusal(json!({"model": "m", "input": "hi", "tool_choice": {"type": "file_search"}}));
        assert!(why.contains("file_search"), "{why}");
        let why =
            refusal(json!({"model": "m", "input": [{"type": "local_shell_call", "call_id": "c"}]}));
        assert_eq!(why, "input[0]: items of type local_shell_call are not supported by a chat-completions backend");
    }

    #[test]
    fn unknown_fields_are_refused_and_harmless_ones_dropped() {
        let why = refusal(json!({"model": "m", "input": "hi", "max_tool_calls": 3}));
        assert!(
            why.starts_with("`max_tool_calls` is not supported"),
            "{why}"
        );
        let mut body = json!({"model": "m", "input": "hi"});
        for field in DROPPED {
            body[*field] = json!("x");
        }
        let chat = request(body).unwrap();
        assert_eq!(
            chat,
            json!({"model": "qwen3:8b", "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn images_by_file_id_and_input_files_are_refused() {
        let why = refusal(json!({"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-123", "detail": "auto"},
        ]}]}));
        assert!(
            why.starts_with("input[0].content[0]: images by file_id"),
            "{why}"
        );
        let why = refusal(json!({"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": "file-123"},
        ]}]}));
        assert!(why.contains("input_file"), "{why}");
        // A system message takes text only.
        let why = refusal(
            json!({"model": "m", "input": [{"role": "system", "content": [
                {"type": "input_image", "image_url": "https://x/y.png"},
            ]}]}),
        );
        assert!(
            why.starts_with("input[0].content[0]: content parts of type input_image"),
            "{why}"
        );
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let cases = [
            (json!({"model": "m"}), "`input` is required"),
            (
                json!({"model": "m", "input": []}),
                "`input` must not be empty",
            ),
            (
                json!({"model": "m", "input": 3}),
                "`input` must be a string or a list of items",
            ),
            (
                json!({"model": "m", "input": [{"role": "tool", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[0].call_id",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}),
                "input[0].output",
            ),
            (
                json!({"model": "m", "input": "hi", "max_output_tokens": "9"}),
                "`max_output_tokens` must be a number",
            ),
            (
                json!({"model": "m", "input": "hi", "instructions": 1}),
                "`instructions` must be a string",
            ),
            (
                json!({"model": "m", "input": "hi", "tool_choice": "any"}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "input": "hi", "text": {"format": {"type": "yaml"}}}),
                "text.format.type",
            ),
            (
                json!({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema"}}}),
                "text.format.name",
            ),
        ];
        for (body, expected) in cases {
            let why = refusal(body.clone());
            assert!(why.contains(expected), "{body}: {why}");
        }
    }

    #[test]
    fn a_call_without_an_assistant_message_before_it_gets_one() {
        let chat = request(json!({"model": "m", "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        ], "text": {"format": {"type": "json_object"}}}))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                ]},
            ])
        );
        assert_eq!(chat["response_format"], json!({"type": "json_object"}));
    }

    #[test]
    fn the_answer_ids_are_the_gateways_and_unique_per_request() {
        let chat = json!({"choices": [{"message": {"role": "assistant", "content": "hi", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ]}, "finish_reason": "tool_calls"}]});
        let one = answer(chat.clone(), 1).unwrap();
        let other = answer(chat, 0xabc).unwrap();
        assert_eq!(one["id"], "resp_0000000000000001");
        assert_eq!(other["id"], "resp_0000000000000abc");
        assert_eq!(other["output"][0]["id"], "msg_0000000000000abc");
        assert_eq!(other["output"][1]["id"], "fc_0000000000000abc_0");
        assert_eq!(other["output"][1]["call_id"], "call_1");
        assert_eq!(other["store"], false);
        // No usage in the chat answer: none in the Response.
        assert_eq!(other["usage"], Value::Null);
    }

    #[test]
    fn a_refusal_is_the_text_of_an_incomplete_answer() {
        let response = answer(
            json!({"choices": [{"message": {"role": "assistant", "content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}]}),
            0,
        )
        .unwrap();
        assert_eq!(response["status"], "incomplete");
        assert_eq!(
            response["incomplete_details"],
            json!({"reason": "content_filter"})
        );
        assert_eq!(
            response["output"][0]["content"][0]["text"],
            "I can't help with that."
        );
    }

    #[test]
    fn malformed_answers_are_malformed() {
        for body in [
            json!([]),
            json!({"choices": []}),
            json!({"choices": [{"finish_reason": "stop"}]}),
            json!({"choices": [{"message": {"tool_calls": {}}}]}),
            json!({"choices": [{"message": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]}),
        ] {
            assert!(answer(body.clone(), 0).is_err(), "{body}");
        }
        assert!(from_chat_response(b"not json", &reply(0)).is_err());
    }

    #[test]
    fn usage_takes_the_chat_counts_and_their_details() {
        let usage = ResponseUsage::of_chat(&json!({
            "prompt_tokens": 10, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }))
        .to_json();
        assert_eq!(
            usage,
            json!({
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": 2},
                "total_tokens": 15,
            })
        );
    }
}
