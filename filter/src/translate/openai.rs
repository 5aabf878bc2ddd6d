//! The OpenAI shapes the translators answer in: a chat completion, its stream chunks, an
//! embedding list and an error, built one way for every protocol.

use serde_json::{json, Value};

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

/// One `chat.completion.chunk` with one choice's delta.
pub fn chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish_reason: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
    })
}

/// The final chunk of a stream whose client asked `stream_options.include_usage`: no choices.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: TokenUsage) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.to_json(),
    })
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

/// Appends `data: <json>` and the blank line that ends an event.
pub fn sse_data(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

/// The event that ends an OpenAI stream.
pub fn sse_done(out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: [DONE]\n\n");
}

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

/// An error inside a stream whose head has gone out: the OpenAI SDKs raise it as an APIError.
pub fn stream_error(out: &mut Vec<u8>, message: &str) {
    sse_data(out, &error(502, message, Some("bad_backend_output")));
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
        sse_data(&mut out, &usage_chunk("x", 1, "m", TokenUsage::default()));
        sse_done(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("data: {") && text.ends_with("}\n\ndata: [DONE]\n\n"));
        assert_eq!(error(404, "no", None)["error"]["type"], "not_found_error");
        assert_eq!(
            data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(stop_list(Some(&json!("x"))), vec!["x".to_string()]);
    }
}
