//! OpenAI ↔ Ollama's native API: chat completions as `/api/chat`, embeddings as `/api/embed`
//! (docs/api.md of the Ollama repository).
//!
//! Ollama's messages are close to OpenAI's: the differences are text-only `content` with images
//! beside it as base64, tool call arguments as JSON objects rather than strings, tool results
//! named by function (`tool_name`) rather than by call id, and sampling parameters inside
//! `options`. Its stream is NDJSON, one object per line, the last with `done: true` and the
//! token counts.

use super::chunks::{self, ChunkWriter};
use super::frames::Lines;
use super::openai::{self, TokenUsage};
use super::{
    not_translated, parse_answer, Backend, Malformed, Object, Refusal, ReplyContext,
    StreamTranslator, Translator, Upstream,
};
use crate::endpoint::{Endpoint, ServiceType};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

const ID: &str = "chatcmpl-ollama";

/// Ollama's native API: chat and embeddings.
pub static BACKEND: Backend = Backend {
    gen_ai_provider: "ollama",
    services: &[ServiceType::Chat, ServiceType::Embedding],
    from_openai: Some(&OpenAiToOllama),
};

/// An OpenAI client in front of Ollama's native API: chat completions and embeddings.
pub struct OpenAiToOllama;

impl Translator for OpenAiToOllama {
    fn backend(&self) -> &'static str {
        "Ollama"
    }

    fn request(&self, endpoint: Endpoint, request: &Object, model: &str) -> Result<Value, Refusal> {
        match endpoint {
            Endpoint::ChatCompletions => chat_request(request, model),
            Endpoint::Embeddings => embed_request(request, model),
            other => Err(not_translated(other, self.backend())),
        }
    }

    fn upstream_path(&self, endpoint: Endpoint, upstream: &Upstream<'_>, _stream: bool) -> String {
        match endpoint {
            Endpoint::Embeddings => format!("{}/api/embed", upstream.prefix),
            _ => format!("{}/api/chat", upstream.prefix),
        }
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

/// OpenAI chat → `/api/chat` body: `{model, messages, stream, options, format, tools}`.
pub fn chat_request(request: &Map<String, Value>, model: &str) -> Result<Value, Refusal> {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Refusal::Invalid("`messages` must be a non-empty list".into()))?;
    let mut out = Vec::with_capacity(messages.len());
    let mut tool_names: HashMap<String, String> = HashMap::new();
    for message in messages {
        out.push(message_of(message, &mut tool_names)?);
    }
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), Value::Array(out));
    // Ollama streams unless told not to; OpenAI does not unless asked.
    body.insert("stream".into(), openai::is_stream(request).into());
    let options = options(request)?;
    if !options.is_empty() {
        body.insert("options".into(), Value::Object(options));
    }
    if let Some(format) = format(request.get("response_format"))? {
        body.insert("format".into(), format);
    }
    if let Some(tools) = tools(request)? {
        body.insert("tools".into(), tools);
    }
    Ok(Value::Object(body))
}

fn message_of(message: &Value, tool_names: &mut HashMap<String, String>) -> Result<Value, Refusal> {
    let role = message
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::Invalid("every message needs a `role`".into()))?;
    let content = message.get("content").unwrap_or(&Value::Null);
    match role {
        "system" | "developer" => {
            Ok(json!({"role": "system", "content": openai::content_text(content)}))
        }
        "user" => {
            let (text, images) = user_content(content)?;
            let mut out = json!({"role": "user", "content": text});
            if let (false, Some(map)) = (images.is_empty(), out.as_object_mut()) {
                map.insert("images".into(), json!(images));
            }
            Ok(out)
        }
        "assistant" => {
            let mut out = json!({"role": "assistant", "content": openai::content_text(content)});
            let calls = match message.get("tool_calls") {
                None | Some(Value::Null) => &[][..],
                Some(Value::Array(calls)) => calls.as_slice(),
                Some(_) => return Err(Refusal::Invalid("`tool_calls` must be a list".into())),
            };
            let mut converted = Vec::with_capacity(calls.len());
            for call in calls {
                let (id, name, arguments) = openai::assistant_tool_call(call)?;
                converted.push(json!({"function": {"name": name, "arguments": arguments}}));
                tool_names.insert(id, name);
            }
            if let (false, Some(map)) = (converted.is_empty(), out.as_object_mut()) {
                map.insert("tool_calls".into(), Value::Array(converted));
            }
            Ok(out)
        }
        "tool" => {
            let mut out = json!({"role": "tool", "content": openai::content_text(content)});
            let id = message.get("tool_call_id").and_then(Value::as_str);
            if let (Some(name), Some(map)) =
                (id.and_then(|id| tool_names.get(id)), out.as_object_mut())
            {
                map.insert("tool_name".into(), name.as_str().into());
            }
            Ok(out)
        }
        other => Err(Refusal::Invalid(format!("unknown message role `{other}`"))),
    }
}

/// A user message's text (its text parts joined) and its images (base64, no data URL prefix).
fn user_content(content: &Value) -> Result<(String, Vec<String>), Refusal> {
    let parts = match content {
        Value::Null => return Ok((String::new(), Vec::new())),
        Value::String(text) => return Ok((text.clone(), Vec::new())),
        Value::Array(parts) => parts,
        _ => {
            return Err(Refusal::Invalid(
                "message `content` must be a string or a list of parts".into(),
            ))
        }
    };
    let mut text = String::new();
    let mut images = Vec::new();
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default())
            }
            Some("image_url") => images.push(openai::inline_image(part)?.1.to_string()),
            Some(other) => {
                return Err(Refusal::Unsupported(format!(
                    "content parts of type `{other}`"
                )))
            }
            None => return Err(Refusal::Invalid("a content part needs a `type`".into())),
        }
    }
    Ok((text, images))
}

fn options(request: &Map<String, Value>) -> Result<Map<String, Value>, Refusal> {
    let mut options = Map::new();
    for key in [
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "presence_penalty",
        "frequency_penalty",
    ] {
        if let Some(value) = openai::number(request, key)? {
            options.insert(key.into(), value);
        }
    }
    if let Some(limit) = openai::max_tokens(request)? {
        options.insert("num_predict".into(), limit);
    }
    let stop = openai::stop_list(request.get("stop"));
    if !stop.is_empty() {
        options.insert("stop".into(), json!(stop));
    }
    if let Some(n) = openai::number(request, "n")? {
        if n.as_u64() != Some(1) {
            return Err(Refusal::Unsupported("`n` other than 1".into()));
        }
    }
    Ok(options)
}

fn format(response_format: Option<&Value>) -> Result<Option<Value>, Refusal> {
    let Some(format) = response_format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some("json".into())),
        Some("json_schema") => format
            .get("json_schema")
            .and_then(|s| s.get("schema"))
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                Refusal::Invalid("`response_format.json_schema.schema` is missing".into())
            }),
        _ => Err(Refusal::Invalid(
            "`response_format.type` must be text, json_object or json_schema".into(),
        )),
    }
}

/// Function tools go as they are: Ollama takes OpenAI's shape. It has no `tool_choice`: `none`
/// is said by sending no tools, and forcing a call cannot be said at all.
fn tools(request: &Map<String, Value>) -> Result<Option<Value>, Refusal> {
    match request.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(choice)) if choice == "auto" => {}
        Some(Value::String(choice)) if choice == "none" => return Ok(None),
        Some(_) => {
            return Err(Refusal::Unsupported(
                "`tool_choice` other than auto or none".into(),
            ))
        }
    }
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(Refusal::Invalid("`tools` must be a list".into())),
    };
    for tool in tools {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err(Refusal::Unsupported(format!("tools of type `{other}`"))),
            None => return Err(Refusal::Invalid("a tool needs a `type`".into())),
        }
        if tool
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(Refusal::Invalid("a function tool needs a `name`".into()));
        }
    }
    Ok(Some(Value::Array(tools.clone())))
}

/// `/api/chat` answer (`stream: false`) → OpenAI `chat.completion`. `thinking` is dropped.
pub fn chat_response(body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    let answer = parse_answer(body)?;
    let message = answer
        .get("message")
        .filter(|m| m.is_object())
        .ok_or_else(|| Malformed::new("the backend's answer has no message"))?;
    let content = message
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let calls: Vec<Value> = tool_calls(message, 0)?
        .into_iter()
        .map(|(index, name, arguments)| {
            json!({"id": format!("call_{index}"), "type": "function",
                   "function": {"name": name, "arguments": arguments}})
        })
        .collect();
    let finish = finish_reason(&answer, !calls.is_empty());
    let content = if content.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        Value::String(content.to_string())
    };
    let mut out = json!({"role": "assistant", "content": content});
    if let (false, Some(map)) = (calls.is_empty(), out.as_object_mut()) {
        map.insert("tool_calls".into(), Value::Array(calls));
    }
    let completion = openai::chat_completion(
        ID,
        reply.created,
        &reply.model,
        out,
        Some(finish),
        Some(usage_of(&answer)),
    );
    Ok(completion.to_string().into_bytes())
}

/// A message's tool calls, numbered from `first`: (index, name, arguments as a JSON string).
fn tool_calls(message: &Value, first: usize) -> Result<Vec<(usize, String, String)>, Malformed> {
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(Malformed::new(
                "the backend's answer has `tool_calls` that are not a list",
            ))
        }
    };
    let mut out = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::new("the backend's answer has a tool call without a name"))?;
        let arguments = match function.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => "{}".to_string(),
            Some(Value::String(text)) => text.clone(),
            Some(arguments) => arguments.to_string(),
        };
        out.push((first.saturating_add(i), name.to_string(), arguments));
    }
    Ok(out)
}

fn finish_reason(answer: &Map<String, Value>, tool_calls: bool) -> &'static str {
    match answer.get("done_reason").and_then(Value::as_str) {
        Some("length") => "length",
        _ if tool_calls => "tool_calls",
        _ => "stop",
    }
}

fn usage_of(answer: &Map<String, Value>) -> TokenUsage {
    let count = |key: &str| answer.get(key).and_then(Value::as_u64).unwrap_or(0);
    TokenUsage {
        prompt: count("prompt_eval_count"),
        completion: count("eval_count"),
    }
}

/// `/api/chat` NDJSON stream → OpenAI chunks.
pub struct ChatStream {
    lines: Lines,
    state: StreamState,
}

struct StreamState {
    chunks: ChunkWriter,
    /// A line came (the role chunk is out).
    started: bool,
    /// The `done` line or an error was translated, `[DONE]` is out; the rest is ignored.
    over: bool,
    tool_calls: usize,
    /// What the `done` line counted.
    usage: Option<TokenUsage>,
}

impl ChatStream {
    pub fn new(reply: ReplyContext) -> ChatStream {
        ChatStream {
            lines: Lines::new(),
            state: StreamState {
                chunks: ChunkWriter::new(reply, ID),
                started: false,
                over: false,
                tool_calls: 0,
                usage: None,
            },
        }
    }
}

impl StreamTranslator for ChatStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        let Self { lines, state } = self;
        lines.feed(chunk, &mut |line| state.on_line(line, out))
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let Self { lines, state } = self;
        lines.finish(&mut |line| state.on_line(line, out))?;
        if state.over {
            Ok(())
        } else {
            Err(Malformed::new("the backend's stream ended early"))
        }
    }

    fn usage(&self) -> Option<TokenUsage> {
        self.state.usage
    }
}

impl StreamState {
    fn on_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        let line = line.trim_ascii();
        if self.over || line.is_empty() {
            return Ok(());
        }
        let object: Map<String, Value> = match serde_json::from_slice(line) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(Malformed::new(
                    "the backend's stream has a line that is not a JSON object",
                ))
            }
        };
        if let Some(error) = object.get("error") {
            let message = error.as_str().unwrap_or("the backend reported an error");
            chunks::failed(out, message);
            self.over = true;
            return Ok(());
        }
        if !self.started {
            self.started = true;
            self.chunks.role(out);
        }
        if let Some(message) = object.get("message") {
            if let Some(text) = message.get("content").and_then(Value::as_str) {
                if !text.is_empty() {
                    self.chunks.content(out, text);
                }
            }
            for (index, name, arguments) in tool_calls(message, self.tool_calls)? {
                self.tool_calls = index.saturating_add(1);
                let id = format!("call_{index}");
                self.chunks.tool_call(out, index, &id, &name, &arguments);
            }
        }
        if object.get("done").and_then(Value::as_bool) == Some(true) {
            self.chunks
                .finish(out, finish_reason(&object, self.tool_calls > 0));
            let usage = usage_of(&object);
            self.usage = Some(usage);
            self.chunks.over(out, usage);
            self.over = true;
        }
        Ok(())
    }
}

/// OpenAI embeddings request → `/api/embed` body `{model, input, dimensions}`.
pub fn embed_request(request: &Map<String, Value>, model: &str) -> Result<Value, Refusal> {
    let inputs = openai::embedding_inputs(request)?;
    let mut body = json!({"model": model, "input": inputs});
    if let (Some(dimensions), Some(map)) =
        (openai::number(request, "dimensions")?, body.as_object_mut())
    {
        map.insert("dimensions".into(), dimensions);
    }
    Ok(body)
}

/// `/api/embed` answer `{embeddings:[[...]], prompt_eval_count}` → OpenAI embedding list.
pub fn embed_response(body: &[u8], reply: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    let answer = parse_answer(body)?;
    let embeddings = answer
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or_else(|| Malformed::new("the backend's answer has no embeddings"))?;
    if embeddings.iter().any(|e| !e.is_array()) {
        return Err(Malformed::new(
            "the backend's answer has an embedding that is not a list",
        ));
    }
    let prompt = answer
        .get("prompt_eval_count")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(
        openai::embedding_list(&reply.model, embeddings.clone(), prompt)
            .to_string()
            .into_bytes(),
    )
}

/// Ollama error body `{"error":"..."}` → its message.
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("error")?.as_str().map(str::to_string)
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
            model: "llama3.2".into(),
            created: 1_700_000_000,
            include_usage,
            nonce: 0,
        }
    }

    fn completion(body: Value) -> Value {
        let out = chat_response(body.to_string().as_bytes(), &reply(false)).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    const WEATHER: &str = r#"{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a given city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city to get the weather for"}}, "required": ["city"]}}}"#;

    #[test]
    fn a_json_schema_becomes_the_format_and_tool_choice_none_drops_the_tools() {
        // Messages, images, tool calls and results, options and JSON mode: the case
        // fixtures/openai_to_ollama/request-chat.
        let weather: Value = serde_json::from_str(WEATHER).unwrap();
        let body = chat_request(
            &request(json!({
                "messages": [{"role": "user", "content": "Ollama is 22 years old."}],
                "stream": true,
                "max_tokens": 7,
                "stop": "END",
                "tools": [weather],
                "tool_choice": "none",
                "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                    "schema": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}}
            })),
            "llama3.1",
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "model": "llama3.1",
                "messages": [{"role": "user", "content": "Ollama is 22 years old."}],
                "stream": true,
                "options": {"num_predict": 7, "stop": ["END"]},
                "format": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
            })
        );
    }

    #[test]
    fn requests_ollama_cannot_take_are_refused() {
        let refusal = |value: Value| chat_request(&request(value), "m").unwrap_err();
        let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
        let with = |key: &str, value: Value| {
            let mut body = user(json!("x"));
            body[key] = value;
            body
        };
        for unsupported in [
            user(json!([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}])),
            user(json!([{"type": "file", "file": {"file_id": "f"}}])),
            with("n", json!(3)),
            with("tool_choice", json!("required")),
            with(
                "tool_choice",
                json!({"type": "function", "function": {"name": "f"}}),
            ),
            with("tools", json!([{"type": "web_search"}])),
        ] {
            assert!(
                matches!(refusal(unsupported.clone()), Refusal::Unsupported(_)),
                "{unsupported}"
            );
        }
        for invalid in [
            json!({"messages": "hi"}),
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[]"}}]}]}),
            user(json!({"text": "x"})),
            with("max_tokens", json!("ten")),
            with("tools", json!([{"type": "function", "function": {}}])),
            with("response_format", json!({"type": "json_schema"})),
        ] {
            assert!(
                matches!(refusal(invalid.clone()), Refusal::Invalid(_)),
                "{invalid}"
            );
        }
    }

    #[test]
    fn a_length_stop_is_a_length_finish_and_missing_counts_are_zero() {
        // The structured-outputs answer of docs/api.md, with a thinking model's `thinking`: the
        // case fixtures/openai_to_ollama/answer-text.
        let out = completion(json!({
            "message": {"role": "assistant", "content": "Once upon"},
            "done_reason": "length", "done": true, "eval_count": 2
        }));
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2})
        );
    }

    #[test]
    fn malformed_answers_are_malformed() {
        for body in [
            &b"{\"model\":"[..],
            b"\"text\"",
            b"{\"done\":true}",
            b"{\"message\":\"hi\"}",
            b"{\"message\":{\"tool_calls\":{}}}",
            b"{\"message\":{\"tool_calls\":[{\"function\":{}}]}}",
        ] {
            assert!(
                chat_response(body, &reply(false)).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    const STREAM: &str = include_str!("fixtures/openai_to_ollama/stream-text.in.ndjson");

    fn stream(include_usage: bool, body: &str) -> Result<Vec<Value>, Malformed> {
        same_under_any_chunking(|| ChatStream::new(reply(include_usage)), body.as_bytes())
            .map(|out| sse_payloads(&out))
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({
            "id": "chatcmpl-ollama",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "llama3.2",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
    }

    #[test]
    fn a_stream_becomes_openai_chunks_however_it_is_cut() {
        let mut expected = vec![
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "The"}), Value::Null),
            chunk(json!({"content": " sky 你好"}), Value::Null),
            chunk(json!({"content": "!"}), Value::Null),
            chunk(json!({}), json!("stop")),
        ];
        let mut without = expected.clone();
        without.push(json!("[DONE]"));
        assert_eq!(stream(false, STREAM).unwrap(), without);
        expected.push(json!({
            "id": "chatcmpl-ollama",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "llama3.2",
            "choices": [],
            "usage": {"prompt_tokens": 26, "completion_tokens": 282, "total_tokens": 308}
        }));
        expected.push(json!("[DONE]"));
        assert_eq!(stream(true, STREAM).unwrap(), expected);
        // CRLF, blank lines, and a done line the stream ends on without a newline.
        let crlf = STREAM.replace('\n', "\r\n\r\n");
        assert_eq!(stream(true, crlf.trim_end()).unwrap(), expected);
        // What follows the done line is ignored.
        let after = format!("{STREAM}{{\"message\":{{\"content\":\"late\"}}}}\nnot json\n");
        assert_eq!(stream(true, &after).unwrap(), expected);
    }

    #[test]
    fn streamed_tool_calls_become_tool_call_deltas() {
        let body = concat!(
            "{\"model\":\"llama3.2\",\"created_at\":\"2025-07-07T20:22:19.184789Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\",",
            "\"tool_calls\":[{\"function\":{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Tokyo\"}}}]},\"done\":false}\n",
            "{\"message\":{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"function\":{\"name\":\"get_time\",\"arguments\":{\"zone\":\"JST\"}}}]},\"done\":false}\n",
            "{\"model\":\"llama3.2\",\"created_at\":\"2025-07-07T20:22:19.19314Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true,",
            "\"prompt_eval_count\":169,\"eval_count\":15}\n",
        );
        let out = stream(false, body).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(
            out[1]["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Tokyo\"}"}}]})
        );
        assert_eq!(out[2]["choices"][0]["delta"]["tool_calls"][0]["index"], 1);
        assert_eq!(
            out[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "call_1"
        );
        assert_eq!(out[3]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out[4], json!("[DONE]"));
    }

    #[test]
    fn an_error_line_ends_the_stream_with_an_error_event() {
        // docs/api/errors.mdx: an error mid-stream is an object with `error`.
        let body = concat!(
            "{\"model\":\"gemma4\",\"message\":{\"role\":\"assistant\",\"content\":\" Yes\"},\"done\":false}\n",
            "{\"error\":\"an error was encountered while running the model\"}\n",
            "{\"model\":\"gemma4\",\"message\":{\"role\":\"assistant\",\"content\":\"ignored\"},\"done\":true}\n",
        );
        let out = stream(true, body).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[1]["choices"][0]["delta"]["content"], " Yes");
        assert_eq!(
            out[2]["error"]["message"],
            "an error was encountered while running the model"
        );
        assert_eq!(out[3], json!("[DONE]"));
    }

    #[test]
    fn a_stream_without_its_done_line_ended_early() {
        let early = Err(Malformed::new("the backend's stream ended early"));
        let cut = STREAM.rsplit_once("{\"model\"").unwrap().0;
        assert_eq!(stream(true, cut), early);
        assert_eq!(stream(true, ""), early);
        // A done line cut in the middle is not JSON.
        let half = &STREAM[..STREAM.len() - 20];
        assert!(
            matches!(stream(true, half), Err(m) if m != Malformed::new("the backend's stream ended early"))
        );
    }

    #[test]
    fn malformed_lines_are_malformed() {
        for body in [
            "{\"message\":{\"content\":\"a\"},\"done\":false}\n{broken\n",
            "[1]\n",
            "{\"message\":{\"tool_calls\":[{\"function\":{\"arguments\":{}}}]},\"done\":false}\n",
        ] {
            assert!(stream(false, body).is_err(), "{body}");
        }
    }

    #[test]
    fn embeddings_go_to_api_embed_and_come_back_as_a_list() {
        let body = embed_request(
            &request(json!({"model": "x", "input": ["Why is the sky blue?", "Why is the grass green?"], "dimensions": 10, "encoding_format": "float"})),
            "all-minilm",
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"model": "all-minilm", "input": ["Why is the sky blue?", "Why is the grass green?"], "dimensions": 10})
        );
        let body = embed_request(
            &request(json!({"input": "Why is the sky blue?"})),
            "all-minilm",
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"model": "all-minilm", "input": ["Why is the sky blue?"]})
        );
        assert!(matches!(
            embed_request(&request(json!({"input": [1, 2, 3]})), "m"),
            Err(Refusal::Unsupported(_))
        ));
        let answer = json!({
            "model": "all-minilm",
            "embeddings": [[0.010071029, -0.0017594862], [-0.0098027075, 0.06042469]],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": 8
        });
        let out: Value = serde_json::from_slice(
            &embed_response(answer.to_string().as_bytes(), &reply(false)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.010071029, -0.0017594862]},
                    {"object": "embedding", "index": 1, "embedding": [-0.0098027075, 0.06042469]}
                ],
                "model": "llama3.2",
                "usage": {"prompt_tokens": 8, "total_tokens": 8}
            })
        );
        for bad in [&b"{\"embedding\":[1]}"[..], b"{\"embeddings\":[1]}", b""] {
            assert!(embed_response(bad, &reply(false)).is_err());
        }
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            error_message(br#"{"error": "model \"llama9\" not found, try pulling it first"}"#)
                .as_deref(),
            Some("model \"llama9\" not found, try pulling it first")
        );
        assert_eq!(error_message(b"{\"error\": {\"message\": \"x\"}}"), None);
        assert_eq!(error_message(b"404 page not found"), None);
    }
}
