//! The one writer of an OpenAI chat stream, for every translator whose client speaks OpenAI:
//! `chat.completion.chunk` events with one choice, the usage chunk the client asked for, and
//! `data: [DONE]`. The JSON text is written directly: a token costs its escaping and a copy, not
//! a `Value` tree built and walked for each chunk.

use super::openai::{self, TokenUsage, SSE_DONE};
use super::ReplyContext;
use crate::json_text::{push_decimal, push_string};

/// Writes the chunks of one stream. Every chunk carries the same id, `created` and model.
pub struct ChunkWriter {
    reply: ReplyContext,
    id: String,
    /// The event being written, kept for its capacity.
    text: String,
}

impl ChunkWriter {
    pub fn new(reply: ReplyContext, id: impl Into<String>) -> ChunkWriter {
        ChunkWriter {
            reply,
            id: id.into(),
            text: String::new(),
        }
    }

    /// The chunks' id, when the backend names its answer after the stream began to be read.
    pub fn set_id(&mut self, id: String) {
        self.id = id;
    }

    /// The first chunk: the assistant's role, no content yet.
    pub fn role(&mut self, out: &mut Vec<u8>) {
        self.chunk(out, r#"{"role":"assistant","content":""}"#, None, None);
    }

    /// A piece of the answer's text.
    pub fn content(&mut self, out: &mut Vec<u8>, text: &str) {
        self.chunk(out, r#"{"content":"#, Some(text), None);
    }

    /// A tool call begins: its id, function name and the first of its arguments (JSON text).
    pub fn tool_call(
        &mut self,
        out: &mut Vec<u8>,
        index: usize,
        id: &str,
        name: &str,
        arguments: &str,
    ) {
        let mut delta = String::with_capacity(64);
        delta.push_str(r#"{"tool_calls":[{"index":"#);
        push_decimal(&mut delta, index as u64);
        delta.push_str(r#","id":"#);
        push_string(&mut delta, id);
        delta.push_str(r#","type":"function","function":{"name":"#);
        push_string(&mut delta, name);
        delta.push_str(r#","arguments":"#);
        push_string(&mut delta, arguments);
        delta.push_str("}}]}");
        self.chunk(out, &delta, None, None);
    }

    /// More of the arguments of the tool call `index`.
    pub fn tool_arguments(&mut self, out: &mut Vec<u8>, index: usize, arguments: &str) {
        let mut delta = String::with_capacity(48);
        delta.push_str(r#"{"tool_calls":[{"index":"#);
        push_decimal(&mut delta, index as u64);
        delta.push_str(r#","function":{"arguments":"#);
        push_string(&mut delta, arguments);
        delta.push_str("}}]}");
        self.chunk(out, &delta, None, None);
    }

    /// The chunk with the choice's `finish_reason` and an empty delta.
    pub fn finish(&mut self, out: &mut Vec<u8>, reason: &str) {
        self.chunk(out, "{}", None, Some(reason));
    }

    /// The stream is over: the usage chunk when the client asked for it, then `[DONE]`.
    pub fn over(&mut self, out: &mut Vec<u8>, usage: TokenUsage) {
        if self.reply.include_usage {
            self.text.clear();
            self.head();
            let text = &mut self.text;
            text.push_str(r#""choices":[],"usage":{"prompt_tokens":"#);
            push_decimal(text, usage.prompt);
            text.push_str(r#","completion_tokens":"#);
            push_decimal(text, usage.completion);
            text.push_str(r#","total_tokens":"#);
            push_decimal(text, usage.prompt.saturating_add(usage.completion));
            text.push_str("}}");
            event(out, text);
        }
        out.extend_from_slice(SSE_DONE);
    }

    /// `data: {"id":…,"object":…,"created":…,"model":…,` of every chunk, into `self.text`.
    fn head(&mut self) {
        let text = &mut self.text;
        text.push_str(r#"{"id":"#);
        push_string(text, &self.id);
        text.push_str(r#","object":"chat.completion.chunk","created":"#);
        push_decimal(text, self.reply.created);
        text.push_str(r#","model":"#);
        push_string(text, &self.reply.model);
        text.push(',');
    }

    /// One chunk: `delta` (JSON text, or an object's opening followed by `string`'s value and
    /// `}`) and the finish reason.
    fn chunk(
        &mut self,
        out: &mut Vec<u8>,
        delta: &str,
        string: Option<&str>,
        finish: Option<&str>,
    ) {
        self.text.clear();
        self.head();
        let text = &mut self.text;
        text.push_str(r#""choices":[{"index":0,"delta":"#);
        text.push_str(delta);
        if let Some(string) = string {
            push_string(text, string);
            text.push('}');
        }
        text.push_str(r#","logprobs":null,"finish_reason":"#);
        match finish {
            Some(reason) => push_string(text, reason),
            None => text.push_str("null"),
        }
        text.push_str("}]}");
        event(out, text);
    }
}

fn event(out: &mut Vec<u8>, json: &str) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// The stream is over because it went wrong: an OpenAI error event (the SDKs raise it as an
/// APIError), then `[DONE]`.
pub fn failed(out: &mut Vec<u8>, message: &str) {
    let error = openai::error(502, message, Some("bad_backend_output"));
    openai::sse_data(out, &error);
    out.extend_from_slice(SSE_DONE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn writer(include_usage: bool) -> ChunkWriter {
        let reply = ReplyContext {
            model: "m \"1\"".into(),
            created: 7,
            include_usage,
            nonce: 0,
        };
        ChunkWriter::new(reply, "chatcmpl-x")
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 7,
               "model": "m \"1\"",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    #[test]
    fn chunks_are_the_shapes_the_sdks_read_and_escaped_as_serde_escapes() {
        let mut w = writer(true);
        let mut out = Vec::new();
        w.role(&mut out);
        w.content(&mut out, "a \"b\"\n\u{1}你");
        w.tool_call(&mut out, 0, "call_0", "f", r#"{"x":1}"#);
        w.tool_arguments(&mut out, 3, "\"y");
        w.finish(&mut out, "tool_calls");
        w.over(
            &mut out,
            TokenUsage {
                prompt: 3,
                completion: 2,
            },
        );
        let events = crate::translate::frames::sse_payloads(&out);
        let tool = json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                          "function": {"name": "f", "arguments": "{\"x\":1}"}}]});
        let more = json!({"tool_calls": [{"index": 3, "function": {"arguments": "\"y"}}]});
        let usage = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 7,
                           "model": "m \"1\"", "choices": [],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        assert_eq!(
            events,
            vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "a \"b\"\n\u{1}你"}), Value::Null),
                chunk(tool, Value::Null),
                chunk(more, Value::Null),
                chunk(json!({}), json!("tool_calls")),
                usage,
                json!("[DONE]"),
            ]
        );
    }

    #[test]
    fn the_usage_chunk_comes_only_when_asked_and_a_failure_ends_with_done() {
        let mut out = Vec::new();
        writer(false).over(&mut out, TokenUsage::default());
        assert_eq!(out, SSE_DONE);
        let mut out = Vec::new();
        failed(&mut out, "bad");
        let events = crate::translate::frames::sse_payloads(&out);
        assert_eq!(events[0]["error"]["message"], "bad");
        assert_eq!(events[0]["error"]["code"], "bad_backend_output");
        assert_eq!(events[1], "[DONE]");
    }
}
