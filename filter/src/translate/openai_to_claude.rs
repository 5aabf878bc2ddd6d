//! The Anthropic Messages API (`POST /v1/messages`, header `anthropic-version: 2023-06-01`)
//! behind the OpenAI chat API: the request, the answer and its event stream.
//!
//! What maps: system and developer messages become the top-level `system`; text and image parts
//! (base64 `data:` URLs and http(s) URLs) become content blocks; assistant `tool_calls` become
//! `tool_use` blocks and `tool` messages `tool_result` blocks, in one user turn (Anthropic wants
//! the turns to alternate, so consecutive turns of one role are merged); `tools`, `tool_choice`,
//! `parallel_tool_calls: false`, `stop`, `temperature`, `top_p`, `top_k`, `stream`, `user`.
//!
//! What does not (docs/adapters.md names these):
//! - refused: `n` > 1, content parts other than text and images (`input_audio`, `file`), the
//!   legacy `function` role, tools other than functions, `tool_choice` other than the four
//!   OpenAI forms.
//! - ignored: `response_format` (this API version has no JSON mode), `logprobs`, `top_logprobs`,
//!   `logit_bias`, `presence_penalty`, `frequency_penalty`, `seed`, `reasoning_effort`,
//!   `modalities`, `audio`, `prediction`, `service_tier`, `store`, OpenAI's `metadata`,
//!   `web_search_options`, a tool's `strict`, `stream_options` (Anthropic always reports usage,
//!   and the final usage chunk is made here). `temperature` is copied as it is: OpenAI allows up
//!   to 2, Anthropic up to 1, and answers 400 above it.
//! - in answers: `thinking` and `redacted_thinking` blocks, server-tool blocks and citations are
//!   dropped (the chat API has no field for them); cache reads and writes are folded into
//!   `prompt_tokens`.

use super::chunks::{self, ChunkWriter};
use super::frames::{Event, SseEvents};
use super::openai::{self, TokenUsage};
use super::{
    not_translated, parse_answer, Backend, Malformed, Object, Refusal, ReplyContext,
    StreamTranslator, Translator, Upstream,
};
use crate::endpoint::{Endpoint, ServiceType};
use serde_json::{json, Map, Value};

/// Anthropic Messages: chat only.
pub static BACKEND: Backend = Backend {
    gen_ai_provider: "anthropic",
    services: &[ServiceType::Chat],
    from_openai: Some(&OpenAiToClaude),
};

/// An OpenAI client in front of an Anthropic Messages backend: chat completions only.
pub struct OpenAiToClaude;

impl Translator for OpenAiToClaude {
    fn backend(&self) -> &'static str {
        "Anthropic"
    }

    fn request(&self, endpoint: Endpoint, request: &Object, model: &str) -> Result<Value, Refusal> {
        match endpoint {
            Endpoint::ChatCompletions => chat_request(request, model),
            other => Err(not_translated(other, self.backend())),
        }
    }

    fn upstream_path(&self, _: Endpoint, upstream: &Upstream<'_>, _stream: bool) -> String {
        let prefix = upstream.prefix;
        match upstream.path_given {
            Some(path) if path.ends_with("/messages") => format!("{prefix}{path}"),
            _ if prefix.ends_with("/v1") => format!("{prefix}/messages"),
            _ => format!("{prefix}/v1/messages"),
        }
    }

    fn answer(&self, _: Endpoint, body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
        chat_response(body, reply)
    }

    fn stream(&self, reply: ReplyContext) -> Box<dyn StreamTranslator> {
        Box::new(ChatStream::new(reply))
    }

    fn error_message(&self, body: &[u8]) -> Option<String> {
        error_message(body)
    }

    fn usage_in_backend_bytes(&self) -> bool {
        true
    }
}

/// Anthropic requires `max_tokens`; OpenAI clients often leave it out.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn invalid(why: String) -> Refusal {
    Refusal::Invalid(why)
}

fn unsupported(why: String) -> Refusal {
    Refusal::Unsupported(why)
}

/// An OpenAI chat completions request (parsed object) → the Anthropic Messages body.
pub fn chat_request(request: &Map<String, Value>, model: &str) -> Result<Value, Refusal> {
    if request
        .get("n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 1)
    {
        return Err(unsupported(
            "`n` > 1 is not supported by the Anthropic Messages API".into(),
        ));
    }
    let messages = match request.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        _ => return Err(invalid("`messages` must be a non-empty list".into())),
    };
    let (system, turns) = conversation(messages)?;
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("max_tokens".into(), json!(max_tokens(request)?));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    let turns: Vec<Value> = turns
        .into_iter()
        .map(|t| {
            let content = match t.content {
                Content::Text(s) => Value::String(s),
                Content::Blocks(b) => Value::Array(b),
            };
            json!({"role": t.role, "content": content})
        })
        .collect();
    body.insert("messages".into(), Value::Array(turns));
    insert_tools(request, &mut body)?;
    insert_sampling(request, &mut body);
    Ok(Value::Object(body))
}

/// The system text and the turns of OpenAI `messages`: system and developer messages lifted
/// out, tool results made user turns, consecutive turns of one role merged.
fn conversation(messages: &[Value]) -> Result<(Vec<String>, Vec<Turn>), Refusal> {
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("messages[{i}] has no `role`")))?;
        let content = message.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let text = openai::content_text(content);
                if !text.is_empty() {
                    system.push(text);
                }
            }
            "user" => push_turn(&mut turns, "user", user_content(content, i)?),
            "assistant" => push_turn(&mut turns, "assistant", assistant_content(message, i)?),
            "tool" => push_turn(
                &mut turns,
                "user",
                Content::Blocks(vec![tool_result(message, content, i)?]),
            ),
            "function" => {
                return Err(unsupported(format!(
                    "messages[{i}]: the legacy `function` role is not supported by the Anthropic Messages API; use `tool`"
                )))
            }
            other => return Err(invalid(format!("messages[{i}] has an unknown role `{other}`"))),
        }
    }
    if turns.is_empty() {
        return Err(unsupported(
            "the Anthropic Messages API needs at least one user or assistant message".into(),
        ));
    }
    Ok((system, turns))
}

/// `tools` and `tool_choice` (with `parallel_tool_calls`), in Anthropic's forms.
fn insert_tools(
    request: &Map<String, Value>,
    body: &mut Map<String, Value>,
) -> Result<(), Refusal> {
    let Some(list) = request.get("tools").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let tools = tools(list)?;
    // Anthropic refuses a tool_choice without tools; OpenAI does too, so nothing is lost.
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
        let parallel = request.get("parallel_tool_calls").and_then(Value::as_bool);
        if let Some(choice) = tool_choice(request.get("tool_choice"), parallel)? {
            body.insert("tool_choice".into(), choice);
        }
    }
    Ok(())
}

/// `stop`, the sampling parameters Anthropic shares, `stream` and `user` (as `metadata`).
fn insert_sampling(request: &Map<String, Value>, body: &mut Map<String, Value>) {
    let stop = openai::stop_list(request.get("stop"));
    if !stop.is_empty() {
        body.insert("stop_sequences".into(), json!(stop));
    }
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(v) = request.get(key).filter(|v| !v.is_null()) {
            body.insert(key.into(), v.clone());
        }
    }
    if let Some(stream) = request.get("stream").and_then(Value::as_bool) {
        body.insert("stream".into(), json!(stream));
    }
    if let Some(user) = request.get("user").and_then(Value::as_str) {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
}

fn max_tokens(request: &Map<String, Value>) -> Result<u64, Refusal> {
    let given = request
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| request.get("max_tokens").filter(|v| !v.is_null()));
    match given {
        None => Ok(DEFAULT_MAX_TOKENS),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid("`max_tokens` must be a positive integer".into())),
    }
}

/// A turn's content: a plain string until it is merged with another turn.
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

impl Content {
    fn into_blocks(self) -> Vec<Value> {
        match self {
            // Anthropic refuses empty text blocks.
            Content::Text(s) if s.is_empty() => Vec::new(),
            Content::Text(s) => vec![json!({"type": "text", "text": s})],
            Content::Blocks(b) => b,
        }
    }
}

struct Turn {
    role: &'static str,
    content: Content,
}

/// Appends a turn, merged into the last one when it has the same role (Anthropic wants user and
/// assistant turns to alternate; a tool result and the user's next words are one user turn).
fn push_turn(turns: &mut Vec<Turn>, role: &'static str, content: Content) {
    if matches!(&content, Content::Blocks(b) if b.is_empty()) {
        return;
    }
    match turns.last_mut() {
        Some(last) if last.role == role => {
            let mut blocks =
                std::mem::replace(&mut last.content, Content::Blocks(Vec::new())).into_blocks();
            blocks.extend(content.into_blocks());
            last.content = Content::Blocks(blocks);
        }
        _ => turns.push(Turn { role, content }),
    }
}

fn user_content(content: &Value, i: usize) -> Result<Content, Refusal> {
    match content {
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(parts) => parts
            .iter()
            .map(|part| user_part(part, i))
            .collect::<Result<Vec<_>, _>>()
            .map(Content::Blocks),
        _ => Err(invalid(format!(
            "messages[{i}]: a user message's `content` must be a string or a list of parts"
        ))),
    }
}

fn part_type(part: &Value) -> &str {
    part.get("type").and_then(Value::as_str).unwrap_or("")
}

fn text_block(part: &Value, i: usize) -> Result<Value, Refusal> {
    let text = part
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("messages[{i}]: a text part has no `text`")))?;
    Ok(json!({"type": "text", "text": text}))
}

fn unsupported_part(kind: &str, i: usize) -> Refusal {
    unsupported(format!(
        "messages[{i}]: content parts of type `{kind}` are not supported by the Anthropic Messages API"
    ))
}

fn user_part(part: &Value, i: usize) -> Result<Value, Refusal> {
    match part_type(part) {
        "text" => text_block(part, i),
        "image_url" => image_block(part, i),
        other => Err(unsupported_part(other, i)),
    }
}

fn image_block(part: &Value, i: usize) -> Result<Value, Refusal> {
    let url = match part.get("image_url") {
        Some(Value::String(url)) => Some(url.as_str()),
        Some(image) => image.get("url").and_then(Value::as_str),
        None => None,
    }
    .ok_or_else(|| invalid(format!("messages[{i}]: an image_url part has no `url`")))?;
    if let Some((media_type, data)) = openai::data_url(url) {
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid(format!(
        "messages[{i}]: an image URL must be http(s) or a base64 data: URL"
    )))
}

fn assistant_content(message: &Value, i: usize) -> Result<Content, Refusal> {
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(calls)) => calls.as_slice(),
        Some(_) => {
            return Err(invalid(format!(
                "messages[{i}]: `tool_calls` must be a list"
            )))
        }
    };
    let mut blocks = match message.get("content").unwrap_or(&Value::Null) {
        Value::String(s) if calls.is_empty() => return Ok(Content::Text(s.clone())),
        Value::String(s) => Content::Text(s.clone()).into_blocks(),
        Value::Array(parts) => {
            let mut blocks = Vec::new();
            for part in parts {
                let block = match part_type(part) {
                    "text" => text_block(part, i)?,
                    // A refusal the client replays is what the assistant said.
                    "refusal" => json!({
                        "type": "text",
                        "text": part.get("refusal").and_then(Value::as_str).unwrap_or(""),
                    }),
                    other => return Err(unsupported_part(other, i)),
                };
                if block.get("text").and_then(Value::as_str) != Some("") {
                    blocks.push(block);
                }
            }
            blocks
        }
        Value::Null => Vec::new(),
        _ => {
            return Err(invalid(format!(
                "messages[{i}]: an assistant message's `content` must be a string, a list or null"
            )))
        }
    };
    for call in calls {
        blocks.push(tool_use_block(call, i)?);
    }
    Ok(Content::Blocks(blocks))
}

fn tool_use_block(call: &Value, i: usize) -> Result<Value, Refusal> {
    let kind = call
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        return Err(unsupported(format!(
            "messages[{i}]: tool calls of type `{kind}` are not supported by the Anthropic Messages API"
        )));
    }
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("messages[{i}]: a tool call has no `id`")))?;
    let function = call.get("function");
    let name = function
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(format!(
                "messages[{i}]: tool call `{id}` has no function name"
            ))
        })?;
    let arguments = function
        .and_then(|f| f.get("arguments"))
        .and_then(Value::as_str)
        .unwrap_or("");
    // Some clients send "" for a function without parameters.
    let input = if arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str::<Value>(arguments).map_err(|_| {
            invalid(format!(
                "messages[{i}]: the arguments of tool call `{id}` are not valid JSON"
            ))
        })?
    };
    if !input.is_object() {
        return Err(invalid(format!(
            "messages[{i}]: the arguments of tool call `{id}` must be a JSON object"
        )));
    }
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

fn tool_result(message: &Value, content: &Value, i: usize) -> Result<Value, Refusal> {
    let id = message
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(format!(
                "messages[{i}]: a tool message has no `tool_call_id`"
            ))
        })?;
    Ok(json!({
        "type": "tool_result",
        "tool_use_id": id,
        "content": openai::content_text(content),
    }))
}

fn tools(list: &Value) -> Result<Vec<Value>, Refusal> {
    let list = list
        .as_array()
        .ok_or_else(|| invalid("`tools` must be a list".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, tool)| {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(unsupported(format!(
                    "tools[{i}]: tools of type `{kind}` are not supported by the Anthropic Messages API"
                )));
            }
            let function = tool.get("function");
            let name = function
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("tools[{i}] has no function name")))?;
            let schema = function
                .and_then(|f| f.get("parameters"))
                .filter(|p| !p.is_null())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            let mut out = json!({"name": name, "input_schema": schema});
            if let (Some(description), Some(map)) = (
                function
                    .and_then(|f| f.get("description"))
                    .and_then(Value::as_str),
                out.as_object_mut(),
            ) {
                map.insert("description".into(), json!(description));
            }
            Ok(out)
        })
        .collect()
}

fn tool_choice(choice: Option<&Value>, parallel: Option<bool>) -> Result<Option<Value>, Refusal> {
    let mut out = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => return Err(invalid(format!("unknown `tool_choice` `{other}`"))),
        }),
        Some(choice @ Value::Object(_)) => {
            let kind = choice.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(unsupported(format!(
                    "a `tool_choice` of type `{kind}` is not supported by the Anthropic Messages API"
                )));
            }
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`tool_choice` names no function".into()))?;
            Some(json!({"type": "tool", "name": name}))
        }
        Some(_) => {
            return Err(invalid(
                "`tool_choice` must be a string or an object".into(),
            ))
        }
    };
    if parallel == Some(false) {
        // Anthropic says it inside tool_choice, whose default is auto; `none` has no such field.
        let choice = out.get_or_insert_with(|| json!({"type": "auto"}));
        if let Some(map) = choice.as_object_mut() {
            if map.get("type").and_then(Value::as_str) != Some("none") {
                map.insert("disable_parallel_tool_use".into(), json!(true));
            }
        }
    }
    Ok(out)
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn, and any reason added later.
        _ => "stop",
    }
}

fn count(usage: &Value, key: &str) -> u64 {
    usage.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Everything the prompt cost: uncached input plus cache writes and reads.
fn prompt_tokens(usage: &Value) -> u64 {
    count(usage, "input_tokens")
        .saturating_add(count(usage, "cache_creation_input_tokens"))
        .saturating_add(count(usage, "cache_read_input_tokens"))
}

fn arguments_of(input: Option<&Value>) -> String {
    match input {
        Some(Value::Object(map)) if !map.is_empty() => Value::Object(map.clone()).to_string(),
        _ => "{}".into(),
    }
}

/// A non-streamed Anthropic Message → an OpenAI chat.completion.
pub fn chat_response(body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    let message = parse_answer(body)?;
    let id = message
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| Malformed::new("the backend's message has no id"))?;
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| Malformed::new("the backend's message has no content list"))?;
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let part = block
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Malformed::new("the backend's text block has no text"))?;
                text.get_or_insert_with(String::new).push_str(part);
            }
            Some("tool_use") => {
                let (Some(call_id), Some(name)) = (
                    block.get("id").and_then(Value::as_str),
                    block.get("name").and_then(Value::as_str),
                ) else {
                    return Err(Malformed::new(
                        "the backend's tool_use block has no id or name",
                    ));
                };
                calls.push(json!({
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments_of(block.get("input"))},
                }));
            }
            // thinking, redacted_thinking and server-tool blocks: the chat API has no field.
            Some(_) => {}
            None => {
                return Err(Malformed::new(
                    "the backend's message has a content block without a type",
                ))
            }
        }
    }
    let mut answer = json!({"role": "assistant", "content": text});
    if let (false, Some(map)) = (calls.is_empty(), answer.as_object_mut()) {
        map.insert("tool_calls".into(), Value::Array(calls));
    }
    let finish = message
        .get("stop_reason")
        .and_then(Value::as_str)
        .map(finish_reason);
    let usage = message.get("usage").map(|u| TokenUsage {
        prompt: prompt_tokens(u),
        completion: count(u, "output_tokens"),
    });
    let completion = openai::chat_completion(
        &format!("chatcmpl-{id}"),
        reply.created,
        &reply.model,
        answer,
        finish,
        usage,
    );
    Ok(completion.to_string().into_bytes())
}

/// The message of an Anthropic error body `{"type":"error","error":{"type","message"}}`.
pub fn error_message(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    body.get("error")?
        .get("message")?
        .as_str()
        .map(str::to_string)
}

/// Anthropic's event stream → OpenAI chunks. Keeps the message id and the token counts, never
/// the text.
pub struct ChatStream {
    events: SseEvents,
    state: StreamState,
}

struct StreamState {
    chunks: ChunkWriter,
    /// message_start came (the chunks have the message's id).
    started: bool,
    usage: TokenUsage,
    /// Tool blocks seen so far: the next tool call's OpenAI index.
    tools: usize,
    /// The Anthropic index of the tool_use block being streamed.
    tool_block: Option<u64>,
    /// message_stop or an error event came, or the stream was malformed: later input is ignored.
    over: bool,
}

impl ChatStream {
    pub fn new(reply: ReplyContext) -> ChatStream {
        ChatStream {
            events: SseEvents::new(),
            state: StreamState {
                chunks: ChunkWriter::new(reply, ""),
                started: false,
                usage: TokenUsage::default(),
                tools: 0,
                tool_block: None,
                over: false,
            },
        }
    }
}

impl StreamTranslator for ChatStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        let Self { events, state } = self;
        if state.over {
            return Ok(());
        }
        let result = events.feed(chunk, &mut |event| state.on_event(event, out));
        if result.is_err() {
            state.over = true;
        }
        result
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let Self { events, state } = self;
        if state.over {
            return Ok(());
        }
        let result = events.finish(&mut |event| state.on_event(event, out));
        let over = state.over;
        state.over = true;
        result?;
        if over {
            Ok(())
        } else {
            Err(Malformed::new("the backend's stream ended early"))
        }
    }
}

impl StreamState {
    fn on_event(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.over {
            return Ok(());
        }
        let data: Value = if event.data.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(&event.data)
                .map_err(|_| Malformed::new("the backend's stream has an event that is not JSON"))?
        };
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&event.name);
        match kind {
            "message_start" => self.message_start(&data, out),
            "content_block_start" => self.block_start(&data, out),
            "content_block_delta" => self.block_delta(&data, out),
            "content_block_stop" => {
                if data.get("index").and_then(Value::as_u64) == self.tool_block {
                    self.tool_block = None;
                }
                Ok(())
            }
            "message_delta" => self.message_delta(&data, out),
            "message_stop" => {
                self.started()?;
                self.chunks.over(out, self.usage);
                self.over = true;
                Ok(())
            }
            "error" => {
                let error = data.get("error");
                let message = error
                    .and_then(|e| e.get("message"))
                    .or_else(|| error.and_then(|e| e.get("type")))
                    .and_then(Value::as_str)
                    .unwrap_or("the backend's stream reported an error");
                chunks::failed(out, message);
                self.over = true;
                Ok(())
            }
            // ping, and the event types Anthropic says may be added.
            _ => Ok(()),
        }
    }

    fn message_start(&mut self, data: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let message = data.get("message");
        let id = message
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::new("the backend's message_start has no id"))?;
        if let Some(usage) = message.and_then(|m| m.get("usage")) {
            self.usage = TokenUsage {
                prompt: prompt_tokens(usage),
                completion: count(usage, "output_tokens"),
            };
        }
        self.chunks.set_id(format!("chatcmpl-{id}"));
        self.started = true;
        self.chunks.role(out);
        Ok(())
    }

    fn block_start(&mut self, data: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        self.started()?;
        let block = data.get("content_block").unwrap_or(&Value::Null);
        match block.get("type").and_then(Value::as_str) {
            Some("tool_use") => {
                let (Some(call_id), Some(name)) = (
                    block.get("id").and_then(Value::as_str),
                    block.get("name").and_then(Value::as_str),
                ) else {
                    return Err(Malformed::new(
                        "the backend's tool_use block has no id or name",
                    ));
                };
                let index = self.tools;
                self.tools = self.tools.saturating_add(1);
                self.tool_block = data.get("index").and_then(Value::as_u64);
                // The input streams as deltas; it starts as {} and is then sent empty.
                let arguments = match block.get("input") {
                    Some(Value::Object(map)) if !map.is_empty() => arguments_of(block.get("input")),
                    _ => String::new(),
                };
                self.chunks.tool_call(out, index, call_id, name, &arguments);
            }
            Some("text") => {
                let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                if !text.is_empty() {
                    self.chunks.content(out, text);
                }
            }
            // thinking and server-tool blocks have no place in a chat chunk.
            _ => {}
        }
        Ok(())
    }

    fn block_delta(&mut self, data: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        self.started()?;
        let delta = data.get("delta").unwrap_or(&Value::Null);
        match delta.get("type").and_then(Value::as_str) {
            Some("text_delta") => {
                let text = delta
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Malformed::new("the backend's text_delta has no text"))?;
                self.chunks.content(out, text);
            }
            Some("input_json_delta") => {
                let partial = delta
                    .get("partial_json")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        Malformed::new("the backend's input_json_delta has no partial_json")
                    })?;
                let block = data.get("index").and_then(Value::as_u64);
                // Only the tool_use block being streamed; empty pieces say nothing.
                if block.is_some() && block == self.tool_block && !partial.is_empty() {
                    let index = self.tools.saturating_sub(1);
                    self.chunks.tool_arguments(out, index, partial);
                }
            }
            // thinking_delta, signature_delta, citations_delta.
            _ => {}
        }
        Ok(())
    }

    fn message_delta(&mut self, data: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        self.started()?;
        if let Some(usage) = data.get("usage") {
            if usage.get("output_tokens").is_some() {
                self.usage.completion = count(usage, "output_tokens");
            }
            // The counts are cumulative; newer answers repeat the input here.
            if usage.get("input_tokens").is_some() {
                self.usage.prompt = prompt_tokens(usage);
            }
        }
        let stop = data
            .get("delta")
            .and_then(|d| d.get("stop_reason"))
            .and_then(Value::as_str);
        if let Some(stop) = stop {
            self.chunks.finish(out, finish_reason(stop));
        }
        Ok(())
    }

    fn started(&self) -> Result<(), Malformed> {
        if self.started {
            Ok(())
        } else {
            Err(Malformed::new(
                "the backend's stream did not begin with message_start",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MODEL: &str = "claude-sonnet-4-5";

    fn request(body: Value) -> Result<Value, Refusal> {
        chat_request(body.as_object().unwrap(), MODEL)
    }

    fn reply(include_usage: bool) -> ReplyContext {
        ReplyContext {
            model: "claude".into(),
            created: 1_700_000_000,
            include_usage,
            nonce: 0,
        }
    }

    #[test]
    fn max_tokens_stop_and_stream_are_carried() {
        // System messages lifted, sampling carried, `max_tokens` defaulted, the rest ignored: the
        // case fixtures/openai_to_claude/request-system-lifted.
        let with = |extra: Value| {
            let mut b = json!({"messages": [{"role": "user", "content": "hi"}]});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            request(b).unwrap()
        };
        assert_eq!(with(json!({"max_tokens": 1024}))["max_tokens"], 1024);
        assert_eq!(
            with(json!({"max_tokens": 10, "max_completion_tokens": 20}))["max_tokens"],
            20
        );
        assert_eq!(
            with(json!({"stop": ["a", "b"], "stream": true}))["stop_sequences"],
            json!(["a", "b"])
        );
        assert_eq!(with(json!({"stream": true}))["stream"], true);
        assert!(with(json!({})).get("system").is_none());
    }

    #[test]
    fn images_go_as_base64_or_url_sources() {
        let body = request(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
            {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/a.jpg", "detail": "high"}},
            {"type": "text", "text": "Describe these images."},
        ]}]}))
        .unwrap();
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}},
                {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/a.jpg"}},
                {"type": "text", "text": "Describe these images."},
            ]}])
        );
        let ftp = request(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]}]}));
        assert!(matches!(ftp, Err(Refusal::Invalid(_))));
    }

    #[test]
    fn tools_and_tool_choice_map_to_anthropic_forms() {
        let tools = json!([{"type": "function", "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
        }}, {"type": "function", "function": {"name": "get_time"}}]);
        let with = |choice: Value, parallel: Value| {
            request(json!({
                "messages": [{"role": "user", "content": "What is the weather like in San Francisco?"}],
                "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
            }))
            .unwrap()
        };
        let body = with(json!("auto"), Value::Null);
        assert_eq!(
            body["tools"],
            json!([
                {"name": "get_weather", "description": "Get the current weather in a given location",
                 "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}},
                {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
            ])
        );
        assert_eq!(body["tool_choice"], json!({"type": "auto"}));
        assert_eq!(
            with(json!("required"), Value::Null)["tool_choice"],
            json!({"type": "any"})
        );
        assert_eq!(
            with(json!("none"), json!(false))["tool_choice"],
            json!({"type": "none"})
        );
        assert_eq!(
            with(
                json!({"type": "function", "function": {"name": "get_weather"}}),
                json!(false)
            )["tool_choice"],
            json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            with(Value::Null, json!(false))["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert!(with(Value::Null, json!(true)).get("tool_choice").is_none());
        let custom = request(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "custom", "custom": {"name": "grammar"}}]}));
        assert!(matches!(custom, Err(Refusal::Unsupported(_))));
    }

    #[test]
    fn what_anthropic_cannot_say_is_refused() {
        let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
        let cases = [
            (
                json!({"n": 2, "messages": [{"role": "user", "content": "x"}]}),
                true,
            ),
            (
                user(
                    json!([{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]),
                ),
                true,
            ),
            (
                user(json!([{"type": "file", "file": {"file_id": "file-1"}}])),
                true,
            ),
            (
                json!({"messages": [{"role": "function", "name": "f", "content": "x"}]}),
                true,
            ),
            (
                json!({"messages": [{"role": "system", "content": "only a system prompt"}]}),
                true,
            ),
            (json!({"messages": []}), false),
            (json!({"model": "m"}), false),
            (json!({"messages": [{"content": "no role"}]}), false),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
                false,
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
                false,
            ),
            (
                json!({"messages": [{"role": "tool", "content": "no id"}]}),
                false,
            ),
            (
                json!({"max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}),
                false,
            ),
        ];
        for (body, is_unsupported) in cases {
            match request(body.clone()) {
                Err(Refusal::Unsupported(why)) if is_unsupported => assert!(!why.is_empty()),
                Err(Refusal::Invalid(why)) if !is_unsupported => assert!(!why.is_empty()),
                other => panic!("{body}: {other:?}"),
            }
        }
        match request(user(json!([{"type": "input_audio"}]))) {
            Err(Refusal::Unsupported(why)) => assert!(why.contains("input_audio"), "{why}"),
            other => panic!("{other:?}"),
        }
        // n = 1 is what Anthropic does anyway.
        assert!(request(json!({"n": 1, "messages": [{"role": "user", "content": "x"}]})).is_ok());
    }

    fn completion(body: Value) -> Value {
        let bytes = chat_response(body.to_string().as_bytes(), &reply(false)).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_lone_tool_use_has_no_content_and_empty_arguments() {
        // tool_use blocks become tool calls, thinking is dropped, cache counts are folded into
        // the prompt's: the case fixtures/openai_to_claude/answer-tool-use.
        let only_tool = completion(json!({"id": "m", "content": [
            {"type": "tool_use", "id": "t", "name": "get_time", "input": {}}],
            "stop_reason": "tool_use"}));
        assert_eq!(only_tool["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(
            only_tool["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
        assert!(only_tool.get("usage").is_none());
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("pause_turn", "stop"),
            ("refusal", "content_filter"),
        ] {
            let out = completion(json!({"id": "m", "content": [], "stop_reason": stop}));
            assert_eq!(out["choices"][0]["finish_reason"], finish, "{stop}");
        }
    }

    #[test]
    fn a_malformed_message_is_an_error() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"content":[]}"#,
            br#"{"id":"m","content":"text"}"#,
            br#"{"id":"m","content":[{"text":"no type"}]}"#,
            br#"{"id":"m","content":[{"type":"text"}]}"#,
            br#"{"id":"m","content":[{"type":"tool_use","input":{}}]}"#,
        ] {
            assert!(
                chat_response(body, &reply(false)).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn error_bodies_give_their_message() {
        let body = br#"{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
        assert_eq!(
            error_message(body).as_deref(),
            Some("The requested resource could not be found.")
        );
        assert_eq!(error_message(b"<html>502</html>"), None);
        assert_eq!(error_message(br#"{"type":"error"}"#), None);
    }

    /// The basic streaming example of Anthropic's streaming documentation.
    const TEXT_STREAM: &str = include_str!("fixtures/openai_to_claude/stream-text.in.sse");

    /// The tool-use streaming example of the same page (a text block, then a tool_use block
    /// whose input arrives as input_json_delta pieces), with a thinking block before them.
    const TOOL_STREAM: &str = include_str!("fixtures/openai_to_claude/stream-tools.in.sse");

    fn run(chunks: &[&[u8]], include_usage: bool) -> Result<Vec<u8>, (Malformed, Vec<u8>)> {
        let mut stream = ChatStream::new(reply(include_usage));
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(e) = stream.feed(chunk, &mut out) {
                return Err((e, out));
            }
        }
        match stream.finish(&mut out) {
            Ok(()) => Ok(out),
            Err(e) => Err((e, out)),
        }
    }

    /// The data of each event: JSON, or the string `[DONE]`.
    fn events(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.ends_with("\n\n"), "{text}");
        text.split_terminator("\n\n")
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap();
                if data == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(data).unwrap()
                }
            })
            .collect()
    }

    fn deltas(events: &[Value]) -> Vec<(Value, Value)> {
        events
            .iter()
            .filter_map(|e| {
                let choice = e.get("choices")?.get(0)?;
                Some((choice["delta"].clone(), choice["finish_reason"].clone()))
            })
            .collect()
    }

    fn assert_same_under_any_chunking(stream: &str, include_usage: bool) -> Vec<u8> {
        let bytes = stream.as_bytes();
        let whole = run(&[bytes], include_usage).unwrap();
        for split in 0..=bytes.len() {
            let (a, b) = bytes.split_at(split);
            assert_eq!(
                run(&[a, b], include_usage).unwrap(),
                whole,
                "split at {split}"
            );
        }
        let ones: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&ones, include_usage).unwrap(), whole);
        whole
    }

    #[test]
    fn a_text_stream_becomes_chunks_under_any_chunking() {
        let out = assert_same_under_any_chunking(TEXT_STREAM, false);
        let events = events(&out);
        assert_eq!(
            deltas(&events),
            vec![
                (json!({"role": "assistant", "content": ""}), Value::Null),
                (json!({"content": "Hello"}), Value::Null),
                (json!({"content": "!"}), Value::Null),
                (json!({}), json!("stop")),
            ]
        );
        assert_eq!(events.len(), 5);
        assert_eq!(events[4], "[DONE]");
        for e in &events[..4] {
            assert_eq!(e["id"], "chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY");
            assert_eq!(e["object"], "chat.completion.chunk");
            assert_eq!(e["model"], "claude");
            assert_eq!(e["created"], 1_700_000_000);
        }
        // CRLF line endings frame the same events.
        let crlf = TEXT_STREAM.replace('\n', "\r\n");
        assert_eq!(run(&[crlf.as_bytes()], false).unwrap(), out);
    }

    #[test]
    fn the_usage_chunk_comes_only_when_asked() {
        let with = events(&assert_same_under_any_chunking(TEXT_STREAM, true));
        assert_eq!(with.len(), 6);
        assert_eq!(with[4]["choices"], json!([]));
        assert_eq!(
            with[4]["usage"],
            json!({"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40})
        );
        assert_eq!(with[5], "[DONE]");
        let without = events(&run(&[TEXT_STREAM.as_bytes()], false).unwrap());
        assert!(without.iter().all(|e| e.get("usage").is_none()));
    }

    #[test]
    fn a_tool_stream_becomes_tool_call_chunks_under_any_chunking() {
        let out = assert_same_under_any_chunking(TOOL_STREAM, true);
        let events = events(&out);
        assert_eq!(
            deltas(&events),
            vec![
                (json!({"role": "assistant", "content": ""}), Value::Null),
                (
                    json!({"content": "Okay, let's check the weather for San Francisco, CA:"}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                        "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\":"}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": " \"San Francisco, CA\"}"}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 1, "id": "toolu_02",
                        "type": "function", "function": {"name": "get_time", "arguments": ""}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
                    Value::Null
                ),
                (json!({}), json!("tool_calls")),
            ]
        );
        let usage = &events[events.len() - 2]["usage"];
        assert_eq!(
            usage,
            &json!({"prompt_tokens": 572, "completion_tokens": 89, "total_tokens": 661})
        );
        assert_eq!(events[events.len() - 1], "[DONE]");
    }

    #[test]
    fn an_error_event_ends_the_stream_with_an_openai_error() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":3}}}\n\n\
            event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n\
            event: content_block_delta\ndata: not even json\n\n";
        let out = assert_same_under_any_chunking(stream, true);
        let events = events(&out);
        assert_eq!(events.len(), 3);
        assert_eq!(events[1]["error"]["message"], "Overloaded");
        assert_eq!(events[1]["error"]["code"], "bad_backend_output");
        assert_eq!(events[2], "[DONE]");
        // An error before anything else is translated as well.
        let early = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Internal server error\"}}\n\n";
        let events = self::events(&run(&[early.as_bytes()], false).unwrap());
        assert_eq!(events[0]["error"]["message"], "Internal server error");
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn a_stream_that_ends_early_is_an_error() {
        let cut = TEXT_STREAM.split("event: message_stop").next().unwrap();
        let (why, out) = run(&[cut.as_bytes()], true).unwrap_err();
        assert_eq!(why, Malformed::new("the backend's stream ended early"));
        // What came before was passed on; no [DONE] was made up.
        assert_eq!(deltas(&events(&out)).len(), 4);
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
        assert!(run(&[b""], false).is_err());
    }

    #[test]
    fn malformed_events_are_errors() {
        for stream in [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\"\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\n",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\"}}\n\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\"}}\n\n",
        ] {
            let mut translator = ChatStream::new(reply(false));
            let mut out = Vec::new();
            assert!(translator.feed(stream.as_bytes(), &mut out).is_err(), "{stream}");
            // Once broken, the translator stays quiet: the caller has emitted its error.
            let before = out.len();
            translator.feed(TEXT_STREAM.as_bytes(), &mut out).unwrap();
            translator.finish(&mut out).unwrap();
            assert_eq!(out.len(), before);
        }
    }

    #[test]
    fn unknown_events_and_pings_are_ignored() {
        let stream = TEXT_STREAM.replace(
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "event: ping\n\nevent: brand_new\ndata: {\"type\": \"brand_new\", \"x\": 1}\n\n: comment\n\n",
        );
        assert_eq!(
            run(&[stream.as_bytes()], true).unwrap(),
            run(&[TEXT_STREAM.as_bytes()], true).unwrap()
        );
    }
}
