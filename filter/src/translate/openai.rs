//! The OpenAI shapes the translators answer in: a chat completion, an embedding list and an
//! error, built one way for every protocol (its stream chunks: `chunks`), and the readers of an
//! OpenAI request.

use super::{Backend, Malformed, Refusal};
use crate::endpoint::ServiceType;
use serde_json::{json, Map, Value};

/// The OpenAI API: every service type, and nothing to translate for an OpenAI client.
pub static BACKEND: Backend = Backend {
    gen_ai_provider: "openai",
    services: &ServiceType::ALL,
    from_openai: None,
};

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenUsage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt.saturating_add(self.completion),
        })
    }
}

/// A non-streamed `chat.completion` with one choice.
pub fn chat_completion(
    id: &str,
    created: u64,
    model: &str,
    message: Value,
    finish_reason: Option<&str>,
    usage: Option<TokenUsage>,
) -> Value {
    let mut completion = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
    });
    if let (Some(usage), Some(map)) = (usage, completion.as_object_mut()) {
        map.insert("usage".into(), usage.to_json());
    }
    completion
}

/// An embedding list, vectors in input order.
pub fn embedding_list(model: &str, vectors: Vec<Value>, prompt_tokens: u64) -> Value {
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| json!({"object": "embedding", "index": index, "embedding": embedding}))
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

/// The texts of an embeddings request's `input`, a string or a list of strings, after refusing
/// what no adapter's backend takes: token arrays, and encodings other than float and base64.
pub fn embedding_inputs(request: &Map<String, Value>) -> Result<Vec<String>, Refusal> {
    match request.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(_) => {
            return Err(Refusal::Invalid(
                "`encoding_format` must be \"float\" or \"base64\"".into(),
            ))
        }
    }
    let not_text = || Refusal::Invalid("`input` must be a string or a list of strings".into());
    match request.get("input") {
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(Refusal::Invalid("`input` must not be empty".into()))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Number(_) | Value::Array(_) => Err(Refusal::Unsupported(
                    "token arrays as embeddings `input` (this backend takes text)".into(),
                )),
                _ => Err(not_text()),
            })
            .collect(),
        _ => Err(not_text()),
    }
}

/// Whether the client asked for base64 vectors (the OpenAI SDKs do when their caller did not
/// choose), which [`base64_embeddings`] makes of an embedding list.
pub fn wants_base64(request: &Map<String, Value>) -> bool {
    request.get("encoding_format").and_then(Value::as_str) == Some("base64")
}

/// Rewrites each float vector of an embedding list as OpenAI answers `encoding_format:
/// "base64"`: the base64 of its little-endian f32s. The Node SDK decodes whatever comes back when
/// it chose base64 itself, so floats sent back would read as garbage.
pub fn base64_embeddings(list: &mut Value) {
    let Some(data) = list.get_mut("data").and_then(Value::as_array_mut) else {
        return;
    };
    for item in data {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        let Some(vector) = item.get("embedding").and_then(Value::as_array) else {
            continue;
        };
        let mut bytes = Vec::with_capacity(vector.len().saturating_mul(4));
        for x in vector {
            bytes.extend_from_slice(&(x.as_f64().unwrap_or(0.0) as f32).to_le_bytes());
        }
        item.insert("embedding".into(), Value::String(base64(&bytes)));
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3).saturating_mul(4));
    for group in bytes.chunks(3) {
        let byte = |i: usize| u32::from(group.get(i).copied().unwrap_or(0));
        let n = byte(0) << 16 | byte(1) << 8 | byte(2);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                let sextet = ((n >> shift) & 63) as usize;
                out.push(char::from(ALPHABET.get(sextet).copied().unwrap_or(b'A')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Appends `data: <json>` and the blank line that ends an event.
pub fn sse_data(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

/// The event that ends an OpenAI stream.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// The OpenAI error `type` for an HTTP status.
pub fn error_type(status: u32) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// `{"error":{"message","type","param","code"}}` for a backend's error or a bad answer.
pub fn error(status: u32, message: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": error_type(status), "param": null, "code": code}})
}

pub fn error_body(status: u32, message: &str, code: Option<&str>) -> Vec<u8> {
    error(status, message, code).to_string().into_bytes()
}

/// The text of OpenAI message `content`: a string, or the `text` parts of a list of parts.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// A data URL's media type and base64 payload (`data:image/png;base64,....`).
pub fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (media, data) = rest.split_once(',')?;
    let media = media.strip_suffix(";base64")?;
    Some((media, data))
}

/// `stop` as a list of strings (OpenAI accepts a string or a list).
pub fn stop_list(stop: Option<&Value>) -> Vec<String> {
    match stop {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// A numeric field of the request (`null` counts as absent).
pub fn number(request: &Map<String, Value>, key: &str) -> Result<Option<Value>, Refusal> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value @ Value::Number(_)) => Ok(Some(value.clone())),
        Some(_) => Err(Refusal::Invalid(format!("`{key}` must be a number"))),
    }
}

/// The completion's token limit: `max_completion_tokens`, or the older `max_tokens`.
pub fn max_tokens(request: &Map<String, Value>) -> Result<Option<Value>, Refusal> {
    match number(request, "max_completion_tokens")? {
        Some(limit) => Ok(Some(limit)),
        None => number(request, "max_tokens"),
    }
}

/// The media type and base64 payload of an `image_url` content part. Only data URLs: the
/// backends behind adapters take images inline, and the filter fetches nothing.
pub fn inline_image(part: &Value) -> Result<(&str, &str), Refusal> {
    let image = part.get("image_url");
    let url = image
        .and_then(|i| i.get("url"))
        .or(image)
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::Invalid("an `image_url` part needs a `url`".into()))?;
    if url.starts_with("data:") {
        return data_url(url).ok_or_else(|| {
            Refusal::Invalid("an image data URL must be `data:<type>;base64,<data>`".into())
        });
    }
    Err(Refusal::Unsupported(
        "image URLs other than data: URLs (this backend takes images inline only)".into(),
    ))
}

/// One `tool_calls` entry of an assistant message: its id (empty when it has none), function
/// name and parsed arguments (an empty string counts as no arguments).
pub fn assistant_tool_call(call: &Value) -> Result<(String, String, Map<String, Value>), Refusal> {
    let invalid = |why: &str| Refusal::Invalid(format!("an assistant tool call {why}"));
    if let Some(kind) = call.get("type").and_then(Value::as_str) {
        if kind != "function" {
            return Err(Refusal::Unsupported(format!(
                "assistant tool calls of type `{kind}`"
            )));
        }
    }
    let function = call
        .get("function")
        .ok_or_else(|| invalid("needs a `function`"))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("needs a function `name`"))?;
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::String(text)) if text.trim().is_empty() => Map::new(),
        Some(Value::String(text)) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => map,
            _ => return Err(invalid("has `arguments` that are not a JSON object")),
        },
        Some(Value::Object(map)) => map.clone(),
        Some(_) => return Err(invalid("has `arguments` that are not a JSON object")),
    };
    let id = call.get("id").and_then(Value::as_str).unwrap_or_default();
    Ok((id.to_string(), name.to_string(), arguments))
}

/// One event of a backend's chat stream, as the client-side translators read it.
pub enum StreamChunk<'a> {
    /// Nothing to read (an empty event).
    Nothing,
    /// `data: [DONE]`.
    Done,
    /// An error the backend sent in the stream (`{"error": …}`): its message and, when it gave
    /// one, the HTTP status it put in `code` (vLLM and others do).
    Error(&'a str, Option<u32>),
    /// A `chat.completion.chunk`.
    Chunk(&'a Map<String, Value>),
}

/// What a chat stream event's data is, parsed into `slot` (which the chunk borrows).
pub fn read_stream_chunk<'a>(
    data: &[u8],
    slot: &'a mut Value,
) -> Result<StreamChunk<'a>, Malformed> {
    let data = data.trim_ascii();
    if data.is_empty() {
        return Ok(StreamChunk::Nothing);
    }
    if data == b"[DONE]" {
        return Ok(StreamChunk::Done);
    }
    *slot = serde_json::from_slice(data)
        .map_err(|_| Malformed::new("a chunk of the backend's stream is not valid JSON"))?;
    let Some(chunk) = slot.as_object() else {
        return Err(Malformed::new(
            "a chunk of the backend's stream is not a JSON object",
        ));
    };
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .or_else(|| error.as_str())
            .unwrap_or("the backend reported an error");
        let status = error
            .get("code")
            .and_then(Value::as_u64)
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| (400..=599).contains(c));
        return Ok(StreamChunk::Error(message, status));
    }
    Ok(StreamChunk::Chunk(chunk))
}

/// One tool call of a chat answer's message.
pub struct ToolCall<'a> {
    /// The backend's id, or `call_<index>` when it gave none (the client answers with it).
    pub id: String,
    pub name: &'a str,
    /// The arguments as the backend wrote them (JSON text), if it wrote any.
    pub arguments: Option<&'a str>,
}

/// The tool calls of a chat answer's `message`, in order.
pub fn tool_calls(message: &Value) -> Result<Vec<ToolCall<'_>>, Malformed> {
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(_) => return Err(Malformed::new("the backend's tool_calls is not a list")),
    };
    let mut read = Vec::with_capacity(calls.len());
    for (at, call) in calls.iter().enumerate() {
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::new("a tool call of the backend has no function name"))?;
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("call_{at}"), str::to_string);
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str);
        read.push(ToolCall {
            id,
            name,
            arguments,
        });
    }
    Ok(read)
}

/// Whether the client asked for a final usage chunk.
pub fn wants_usage(request: &serde_json::Map<String, Value>) -> bool {
    request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub fn is_stream(request: &serde_json::Map<String, Value>) -> bool {
    request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn shapes_are_the_ones_the_sdks_read() {
        let c = chat_completion(
            "chatcmpl-1",
            7,
            "m",
            json!({"role": "assistant", "content": "hi"}),
            Some("stop"),
            Some(TokenUsage {
                prompt: 3,
                completion: 2,
            }),
        );
        assert_eq!(c["choices"][0]["message"]["content"], "hi");
        assert_eq!(c["usage"]["total_tokens"], 5);
        let mut out = Vec::new();
        sse_data(&mut out, &json!({"a": 1}));
        assert_eq!(out, b"data: {\"a\":1}\n\n");
        assert_eq!(error(404, "no", None)["error"]["type"], "not_found_error");
        assert_eq!(
            data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(stop_list(Some(&json!("x"))), vec!["x".to_string()]);
    }

    #[test]
    fn base64_vectors_are_little_endian_f32s() {
        let mut list = embedding_list("m", vec![json!([1.0, 2.0]), json!([1.0])], 3);
        base64_embeddings(&mut list);
        assert_eq!(list["data"][0]["embedding"], "AACAPwAAAEA=");
        assert_eq!(list["data"][1]["embedding"], "AACAPw==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn request_readers_refuse_what_no_backend_takes() {
        let req = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            embedding_inputs(&req(
                json!({"input": ["a", "b"], "encoding_format": "base64"})
            )),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert!(wants_base64(&req(json!({"encoding_format": "base64"}))));
        assert!(matches!(
            embedding_inputs(&req(json!({"input": [[1, 2]]}))),
            Err(Refusal::Unsupported(_))
        ));
        for bad in [
            json!({"input": []}),
            json!({}),
            json!({"input": "a", "encoding_format": "x"}),
        ] {
            assert!(matches!(
                embedding_inputs(&req(bad)),
                Err(Refusal::Invalid(_))
            ));
        }
        assert_eq!(
            max_tokens(&req(json!({"max_tokens": 5, "max_completion_tokens": 7}))),
            Ok(Some(json!(7)))
        );
        assert_eq!(
            max_tokens(&req(json!({"max_tokens": 5}))),
            Ok(Some(json!(5)))
        );
        assert!(number(&req(json!({"n": "2"})), "n").is_err());
        assert!(matches!(
            inline_image(&json!({"image_url": {"url": "https://x/y.png"}})),
            Err(Refusal::Unsupported(_))
        ));
        assert_eq!(
            inline_image(&json!({"image_url": "data:image/png;base64,AAAA"})),
            Ok(("image/png", "AAAA"))
        );
        let (id, name, args) = assistant_tool_call(
            &json!({"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}),
        )
        .unwrap();
        assert_eq!((id.as_str(), name.as_str(), args.len()), ("c1", "f", 0));
        assert!(
            assistant_tool_call(&json!({"function": {"name": "f", "arguments": "[1]"}})).is_err()
        );
    }
}
