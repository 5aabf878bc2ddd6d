//! OpenAI chat chunks (SSE `data:` lines, `[DONE]`) → the Responses API's event stream, the
//! sequence Codex CLI, the OpenAI SDKs' `responses.stream` and the Agents SDK read:
//! `response.created` and `response.in_progress`; then per output item, in the order the
//! backend sends them (a `message` for the text, a `function_call` per tool call),
//! `response.output_item.added`, its deltas and their `.done` events, `response.output_item.done`;
//! at the end `response.completed`, the whole Response with its usage. Every event carries
//! `sequence_number`: 0, 1, 2, … over the whole stream. `[DONE]` is not forwarded (a Responses
//! stream has none).
//!
//! - A `length` finish is `status: incomplete`, `incomplete_details: {reason:
//!   max_output_tokens}` (`content_filter`: that reason), still in `response.completed`: OpenAI
//!   itself sends `response.incomplete` there, which the SDKs' final-response readers do not
//!   take for an end.
//! - Failure: a backend's error event, a malformed chunk, or a stream that stops before its
//!   finish_reason closes the open item as it is (`status: incomplete`) and ends with
//!   `response.failed` (`error: {code: server_error, message}`): the stream never just stops
//!   (Codex takes that for a broken connection and retries). Nothing is written after the end.
//!   Malformed output is still `Err(Malformed)` (the exchange counts it against the instance),
//!   with `response.failed` already written: the exchange must add no error event of its own.
//! - Dropped: reasoning deltas (`reasoning_content`, vLLM's and DeepSeek's), which a Responses
//!   reasoning item cannot carry faithfully. A `refusal` delta is text of the message.
//! - The Response's `tools`, `tool_choice` and `parallel_tool_calls` are required by the SDKs
//!   but the reply context does not carry the request's: they are `[]`, `auto` and `true`.
//!   `store` is `false`: nothing is stored.
//! - Memory: each item's text or arguments are kept for its `.done` events and the final
//!   Response, so a stream holds what its whole answer would; the rest is a few counters.

use super::{
    function_call_item, message_item, output_text_part, response_object, ResponseIds,
    ResponseUsage, Status,
};
use crate::json_text::{push_decimal, push_string};
use crate::translate::frames::{Event, SseEvents};
use crate::translate::openai::{self, StreamChunk, TokenUsage};
use crate::translate::{Malformed, ReplyContext, StreamTranslator};
use serde_json::{json, Value};

/// A chat stream translated into Responses events as it passes.
#[derive(Debug)]
pub struct ResponseStream {
    reply: ReplyContext,
    ids: ResponseIds,
    sse: SseEvents,
    events: Events,
    started: bool,
    /// The output items so far, in output order (an item's `output_index` is its place).
    items: Vec<Item>,
    /// The last item still takes deltas.
    open: bool,
    /// The highest OpenAI tool call index seen: a delta for an earlier one cannot be placed.
    last_call: Option<u64>,
    finish_reason: Option<String>,
    usage: Option<ResponseUsage>,
    /// `response.completed` or `response.failed` went out: nothing more is said.
    ended: bool,
}

/// One output item of the Response.
#[derive(Debug)]
struct Item {
    id: String,
    /// `in_progress` while open, then `completed` or `incomplete`.
    status: &'static str,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Message {
        text: String,
    },
    /// Fed by the OpenAI tool call of this `index`.
    FunctionCall {
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Writes the events, numbering them.
#[derive(Debug, Default)]
struct Events {
    next: u64,
    /// The event being written, kept for its capacity.
    data: String,
}

impl Events {
    /// `event: <kind>` and its data: `{"type","sequence_number"` and what `members` writes (each
    /// member led by its comma, [`member`]).
    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, members: impl FnOnce(&mut String)) {
        let data = &mut self.data;
        data.clear();
        data.push_str(r#"{"type":"#);
        push_string(data, kind);
        data.push_str(r#","sequence_number":"#);
        push_decimal(data, self.next);
        self.next = self.next.saturating_add(1);
        members(data);
        data.push('}');
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(data.as_bytes());
        out.extend_from_slice(b"\n\n");
    }
}

/// The last item and its `output_index`.
fn last(items: &mut [Item]) -> Option<(u64, &mut Item)> {
    let output_index = items.len().checked_sub(1)? as u64;
    items.last_mut().map(|item| (output_index, item))
}

/// `,"key":`: the start of one more member of an object.
fn member(data: &mut String, key: &str) {
    data.push(',');
    push_string(data, key);
    data.push(':');
}

fn member_value(data: &mut String, key: &str, value: &Value) {
    member(data, key);
    data.push_str(&value.to_string());
}

/// The members every event of an item's content carries.
fn item_members(data: &mut String, item_id: &str, output_index: u64) {
    member(data, "item_id");
    push_string(data, item_id);
    member(data, "output_index");
    push_decimal(data, output_index);
}

impl Item {
    /// The item as the output lists it; `added`: as `response.output_item.added` shows it,
    /// before any of its content.
    fn to_json(&self, added: bool) -> Value {
        match &self.body {
            Body::Message { text } => {
                let mut item = message_item(&self.id, text, self.status);
                // Added before any of its text: no parts yet.
                if let Some(content) = item.get_mut("content").filter(|_| added) {
                    *content = json!([]);
                }
                item
            }
            Body::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => {
                let arguments = if added { "" } else { arguments.as_str() };
                function_call_item(&self.id, call_id, name, arguments, self.status)
            }
        }
    }
}

impl ResponseStream {
    pub fn new(reply: ReplyContext) -> ResponseStream {
        ResponseStream {
            ids: ResponseIds::new(&reply),
            reply,
            sse: SseEvents::new(),
            events: Events::default(),
            started: false,
            items: Vec::new(),
            open: false,
            last_call: None,
            finish_reason: None,
            usage: None,
            ended: false,
        }
    }

    /// What the open item holds, if one is open.
    fn open_body(&self) -> Option<&Body> {
        self.items
            .last()
            .filter(|_| self.open)
            .map(|item| &item.body)
    }

    fn on_event(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.ended {
            return Ok(());
        }
        let mut slot = Value::Null;
        let chunk = match openai::read_stream_chunk(&event.data, &mut slot)? {
            StreamChunk::Nothing => return Ok(()),
            StreamChunk::Done => {
                self.complete(out);
                return Ok(());
            }
            StreamChunk::Error(message, _) => {
                self.break_off(out, message);
                return Ok(());
            }
            StreamChunk::Chunk(chunk) => chunk,
        };
        self.start(out);
        // The usage chunk: an OpenAI `usage` object with its `prompt_tokens`.
        if let Some(usage) = chunk
            .get("usage")
            .filter(|u| u.get("prompt_tokens").is_some())
        {
            self.usage = Some(ResponseUsage::of_chat(usage));
        }
        let choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        // A Responses request asks for one answer: only choice 0 is read.
        for choice in choices
            .iter()
            .filter(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        {
            if let Some(delta) = choice.get("delta") {
                self.delta(delta, out)?;
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_string());
            }
        }
        Ok(())
    }

    /// One choice's delta: its text (or refusal) and its tool calls.
    fn delta(&mut self, delta: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        for key in ["content", "refusal"] {
            if let Some(text) = delta
                .get(key)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.text(text, out);
            }
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                self.tool_call(call, out)?;
            }
        }
        Ok(())
    }

    /// `response.created` and `response.in_progress`, once.
    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let response = self.response(Status::InProgress, None);
        for kind in ["response.created", "response.in_progress"] {
            self.events.emit(out, kind, |data| {
                member_value(data, "response", &response);
            });
        }
    }

    /// The Response as its lifecycle events carry it; `error`: why it failed.
    fn response(&self, status: Status, error: Option<&str>) -> Value {
        let output: Vec<Value> = self.items.iter().map(|item| item.to_json(false)).collect();
        let usage = match status {
            Status::InProgress => Value::Null,
            _ => self.usage.map_or(Value::Null, ResponseUsage::to_json),
        };
        response_object(&self.reply, status, output, usage, error)
    }

    /// Opens the next output item, closing the one before.
    fn open_item(&mut self, id: String, body: Body, out: &mut Vec<u8>) {
        self.close("completed", out);
        let item = Item {
            id,
            status: "in_progress",
            body,
        };
        let added = item.to_json(true);
        let output_index = self.items.len() as u64;
        let message_id = matches!(item.body, Body::Message { .. }).then(|| item.id.clone());
        self.items.push(item);
        self.open = true;
        self.events.emit(out, "response.output_item.added", |data| {
            member(data, "output_index");
            push_decimal(data, output_index);
            member_value(data, "item", &added);
        });
        if let Some(id) = message_id {
            self.events
                .emit(out, "response.content_part.added", |data| {
                    item_members(data, &id, output_index);
                    data.push_str(r#","content_index":0"#);
                    member_value(data, "part", &output_text_part(""));
                });
        }
    }

    /// Closes the open item with `status`: its `.done` events, then `response.output_item.done`.
    fn close(&mut self, status: &'static str, out: &mut Vec<u8>) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let Some((output_index, item)) = last(&mut self.items) else {
            return;
        };
        item.status = status;
        let events = &mut self.events;
        match &item.body {
            Body::Message { text } => {
                events.emit(out, "response.output_text.done", |data| {
                    item_members(data, &item.id, output_index);
                    data.push_str(r#","content_index":0"#);
                    member(data, "text");
                    push_string(data, text);
                    data.push_str(r#","logprobs":[]"#);
                });
                events.emit(out, "response.content_part.done", |data| {
                    item_members(data, &item.id, output_index);
                    data.push_str(r#","content_index":0"#);
                    member_value(data, "part", &output_text_part(text));
                });
            }
            Body::FunctionCall {
                name, arguments, ..
            } => events.emit(out, "response.function_call_arguments.done", |data| {
                item_members(data, &item.id, output_index);
                member(data, "name");
                push_string(data, name);
                member(data, "arguments");
                push_string(data, arguments);
            }),
        }
        let done = item.to_json(false);
        events.emit(out, "response.output_item.done", |data| {
            member(data, "output_index");
            push_decimal(data, output_index);
            member_value(data, "item", &done);
        });
    }

    /// A piece of the message's text: opens a message item unless one is open.
    fn text(&mut self, piece: &str, out: &mut Vec<u8>) {
        if !matches!(self.open_body(), Some(Body::Message { .. })) {
            // The answer's first message has the message id; one after a tool call (rare) is
            // told apart by its place.
            let mut id = self.ids.message();
            if self
                .items
                .iter()
                .any(|i| matches!(i.body, Body::Message { .. }))
            {
                id.push('_');
                push_decimal(&mut id, self.items.len() as u64);
            }
            let body = Body::Message {
                text: String::new(),
            };
            self.open_item(id, body, out);
        }
        let Some((
            output_index,
            Item {
                id,
                body: Body::Message { text },
                ..
            },
        )) = last(&mut self.items)
        else {
            return;
        };
        text.push_str(piece);
        self.events.emit(out, "response.output_text.delta", |data| {
            item_members(data, id, output_index);
            data.push_str(r#","content_index":0"#);
            member(data, "delta");
            push_string(data, piece);
            data.push_str(r#","logprobs":[]"#);
        });
    }

    /// One tool call's delta: opens its function_call item when it is a new call.
    fn tool_call(&mut self, call: &Value, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let open = matches!(self.open_body(), Some(Body::FunctionCall { index: open, .. }) if *open == index);
        if !open {
            if self.last_call.is_some_and(|last| index <= last) {
                return Err(Malformed::new(
                    "the backend's stream went back to an earlier tool call",
                ));
            }
            self.last_call = Some(index);
            let id = self.ids.function_call(index);
            // A backend that names no call id: the item's, unique per request like the rest.
            let call_id = call
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| id.clone(), str::to_string);
            let body = Body::FunctionCall {
                index,
                call_id,
                name: name.to_string(),
                arguments: String::new(),
            };
            self.open_item(id, body, out);
        }
        let Some((
            output_index,
            Item {
                id,
                body:
                    Body::FunctionCall {
                        name: call_name,
                        arguments,
                        ..
                    },
                ..
            },
        )) = last(&mut self.items)
        else {
            return Ok(());
        };
        if call_name.is_empty() {
            // Named in a later chunk than its first: the done events carry it.
            call_name.push_str(name);
        }
        let Some(piece) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        else {
            return Ok(());
        };
        arguments.push_str(piece);
        self.events
            .emit(out, "response.function_call_arguments.delta", |data| {
                item_members(data, id, output_index);
                member(data, "delta");
                push_string(data, piece);
            });
        Ok(())
    }

    /// The answer is whole: its last item closes and `response.completed` goes out.
    fn complete(&mut self, out: &mut Vec<u8>) {
        self.start(out);
        let status = Status::of_finish(self.finish_reason.as_deref());
        self.close(status.item_status(), out);
        self.end("response.completed", status, None, out);
    }

    /// The answer broke off: the open item closes as it is and `response.failed` goes out.
    fn break_off(&mut self, out: &mut Vec<u8>, message: &str) {
        if self.ended {
            return;
        }
        self.start(out);
        self.close(Status::Failed.item_status(), out);
        self.end("response.failed", Status::Failed, Some(message), out);
    }

    fn end(&mut self, kind: &str, status: Status, error: Option<&str>, out: &mut Vec<u8>) {
        let response = self.response(status, error);
        self.events.emit(out, kind, |data| {
            member_value(data, "response", &response);
        });
        self.ended = true;
    }

    /// Malformed output ends the stream with `response.failed` saying what was wrong.
    fn malformed(
        &mut self,
        result: Result<(), Malformed>,
        out: &mut Vec<u8>,
    ) -> Result<(), Malformed> {
        if let Err(Malformed(why)) = &result {
            self.break_off(out, &format!("The backend's stream is malformed: {why}"));
        }
        result
    }
}

impl StreamTranslator for ResponseStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.ended {
            return Ok(());
        }
        let mut sse = std::mem::take(&mut self.sse);
        let result = sse.feed(chunk, &mut |event| self.on_event(event, out));
        self.sse = sse;
        self.malformed(result, out)
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        if self.ended {
            return Ok(());
        }
        let mut sse = std::mem::take(&mut self.sse);
        let result = sse.finish(&mut |event| self.on_event(event, out));
        self.sse = sse;
        self.malformed(result, out)?;
        if self.ended {
            return Ok(());
        }
        if self.finish_reason.is_none() {
            return self.malformed(
                Err(Malformed::new(
                    "the backend's stream ended before its answer did",
                )),
                out,
            );
        }
        // A backend that stops after its finish_reason without `[DONE]` still said it all.
        self.complete(out);
        Ok(())
    }

    /// `response.failed`, unless the stream already ended (a malformed stream ends itself).
    fn fail(&mut self, why: &str, out: &mut Vec<u8>) {
        self.break_off(out, why);
    }

    fn usage(&self) -> Option<TokenUsage> {
        self.usage.map(|c| TokenUsage {
            prompt: c.input,
            completion: c.output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn reply() -> ReplyContext {
        ReplyContext {
            model: "gpt-5-codex".into(),
            created: 1_700_000_000,
            include_usage: true,
            nonce: 0xabc,
        }
    }

    /// A chat stream of these chunks' `choices[0]` (`delta`, `finish_reason`), then the
    /// chunks given whole, then `[DONE]` when `done`.
    fn chat_stream(deltas: &[(Value, Option<&str>)], whole: &[Value], done: bool) -> Vec<u8> {
        let mut stream = Vec::new();
        for (delta, finish) in deltas {
            let chunk = json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "qwen3:8b",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            stream.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
        }
        for chunk in whole {
            stream.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
        }
        if done {
            stream.extend_from_slice(b"data: [DONE]\n\n");
        }
        stream
    }

    /// The events of a Responses stream: each one's type and data, after checking what every
    /// stream is: its framing (`event:` is the data's `type`), `sequence_number` counting 0, 1,
    /// 2, …, `response.created` and `response.in_progress` first, completed or failed last.
    fn events(out: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.ends_with("\n\n"), "unterminated event: {text}");
        let events: Vec<(String, Value)> = text
            .split_terminator("\n\n")
            .map(|event| {
                let (name, data) = event.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap();
                let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap())
                    .unwrap_or_else(|e| panic!("{e}: {data}"));
                assert_eq!(data["type"], name);
                (name.to_string(), data)
            })
            .collect();
        for (n, (_, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], n as u64, "{data}");
        }
        let kinds = kinds(&events);
        assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
        let end = kinds.last().unwrap();
        assert!(
            ["response.completed", "response.failed"].contains(end),
            "{end}"
        );
        events
    }

    /// The translation of a chat stream of these deltas that ends well (`[DONE]`).
    fn answer(deltas: &[(Value, Option<&str>)]) -> Vec<(String, Value)> {
        let (result, events) = translate(&chat_stream(deltas, &[], true));
        result.unwrap();
        events
    }

    /// The stream fed in these pieces as the exchange feeds it (nothing more after an error),
    /// then finished: the result and the output, which a failed stream has too.
    fn run(pieces: &[&[u8]]) -> (Result<(), Malformed>, Vec<u8>) {
        let mut translator = ResponseStream::new(reply());
        let mut out = Vec::new();
        let mut result = Ok(());
        for piece in pieces {
            result = result.and_then(|()| translator.feed(piece, &mut out));
        }
        result = result.and_then(|()| translator.finish(&mut out));
        (result, out)
    }

    /// The stream translated, the same cut at every byte and fed a byte at a time (the output
    /// of a failure too): its result and its events.
    fn translate(stream: &[u8]) -> (Result<(), Malformed>, Vec<(String, Value)>) {
        let whole = run(&[stream]);
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(run(&[a, b]), whole, "cut at byte {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "fed a byte at a time");
        let (result, out) = whole;
        (result, events(&out))
    }

    fn kinds(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(kind, _)| kind.as_str()).collect()
    }

    fn last(events: &[(String, Value)]) -> &Value {
        &events.last().unwrap().1["response"]
    }

    #[test]
    fn a_text_stream_is_the_responses_event_sequence() {
        let events = answer(&[
            (json!({"role": "assistant", "content": ""}), None),
            (json!({"content": "Hello"}), None),
            (json!({"content": " \"世界\"\n"}), None),
            (json!({}), Some("stop")),
        ]);
        assert_eq!(
            kinds(&events)[2..],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let created = &events[0].1["response"];
        assert_eq!(created["id"], "resp_0000000000000abc");
        assert_eq!(created["status"], "in_progress");
        assert_eq!(created["output"], json!([]));
        assert_eq!(created["model"], "gpt-5-codex");
        assert_eq!(created["created_at"], 1_700_000_000);
        let added = &events[2].1;
        assert_eq!(added["output_index"], 0);
        assert_eq!(
            added["item"],
            json!({"type": "message", "id": "msg_0000000000000abc", "status": "in_progress",
                   "role": "assistant", "content": []})
        );
        assert_eq!(events[3].1["part"]["text"], "");
        assert_eq!(events[5].1["delta"], " \"世界\"\n");
        assert_eq!(events[5].1["item_id"], "msg_0000000000000abc");
        assert_eq!(events[5].1["content_index"], 0);
        assert_eq!(events[6].1["text"], "Hello \"世界\"\n");
        let message = json!({
            "type": "message", "id": "msg_0000000000000abc", "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello \"世界\"\n", "annotations": [], "logprobs": []}],
        });
        assert_eq!(events[8].1["item"], message);
        let completed = last(&events);
        assert_eq!(completed["status"], "completed");
        assert_eq!(completed["output"], json!([message]));
        assert_eq!(completed["incomplete_details"], Value::Null);
        assert_eq!(completed["error"], Value::Null);
        assert_eq!(completed["store"], false);
    }

    #[test]
    fn two_tool_calls_are_two_function_call_items() {
        let call = |index: u64, id: Option<&str>, name: Option<&str>, arguments: &str| {
            let mut function = json!({"arguments": arguments});
            if let Some(name) = name {
                function["name"] = name.into();
            }
            let mut call = json!({"index": index, "function": function});
            if let Some(id) = id {
                call["id"] = id.into();
                call["type"] = "function".into();
            }
            (json!({"tool_calls": [call]}), None)
        };
        let events = answer(&[
            (json!({"role": "assistant", "content": null}), None),
            call(0, Some("call_a"), Some("get_weather"), ""),
            call(0, None, None, "{\"city\":"),
            call(0, None, None, "\"Paris\"}"),
            // No call id: the item's stands in.
            call(1, None, Some("get_time"), "{}"),
            (json!({}), Some("tool_calls")),
        ]);
        assert_eq!(
            kinds(&events)[2..],
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(
            events[2].1["item"],
            json!({"type": "function_call", "id": "fc_0000000000000abc_0", "call_id": "call_a",
                   "name": "get_weather", "arguments": "", "status": "in_progress"})
        );
        assert_eq!(events[3].1["item_id"], "fc_0000000000000abc_0");
        assert_eq!(events[3].1["output_index"], 0);
        assert_eq!(events[5].1["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(events[5].1["name"], "get_weather");
        assert_eq!(events[7].1["output_index"], 1);
        let output = &last(&events)["output"];
        assert_eq!(
            output,
            &json!([
                {"type": "function_call", "id": "fc_0000000000000abc_0", "call_id": "call_a",
                 "name": "get_weather", "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
                {"type": "function_call", "id": "fc_0000000000000abc_1",
                 "call_id": "fc_0000000000000abc_1", "name": "get_time", "arguments": "{}",
                 "status": "completed"},
            ])
        );
    }

    #[test]
    fn text_then_a_tool_call_are_items_in_that_order() {
        let events = answer(&[
            (json!({"content": "Let me look."}), None),
            (
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "ls", "arguments": "{\"path\":\".\"}"}}]}),
                None,
            ),
            (json!({}), Some("tool_calls")),
        ]);
        let at = |kind: &str| kinds(&events).iter().position(|k| *k == kind).unwrap();
        // The message is done before the call is added.
        assert!(at("response.output_item.done") < at("response.function_call_arguments.delta"));
        let output = &last(&events)["output"];
        assert_eq!(output[0]["type"], "message");
        assert_eq!(output[0]["content"][0]["text"], "Let me look.");
        assert_eq!(output[1]["type"], "function_call");
        assert_eq!(output[1]["arguments"], "{\"path\":\".\"}");
        let call_added = events
            .iter()
            .filter(|(kind, _)| kind == "response.output_item.added")
            .nth(1)
            .unwrap();
        assert_eq!(call_added.1["output_index"], 1);
    }

    #[test]
    fn the_final_usage_chunk_is_the_responses_usage() {
        let usage = json!({
            "prompt_tokens": 82, "completion_tokens": 37, "total_tokens": 119,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 12},
        });
        let stream = chat_stream(
            &[(json!({"content": "ok"}), None), (json!({}), Some("stop"))],
            &[json!({"id": "chatcmpl-1", "choices": [], "usage": usage})],
            true,
        );
        let (result, events) = translate(&stream);
        result.unwrap();
        assert_eq!(events[0].1["response"]["usage"], Value::Null);
        assert_eq!(
            last(&events)["usage"],
            json!({
                "input_tokens": 82,
                "input_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 0},
                "output_tokens": 37,
                "output_tokens_details": {"reasoning_tokens": 12},
                "total_tokens": 119,
            })
        );
        let mut translator = ResponseStream::new(reply());
        translator.feed(&stream, &mut Vec::new()).unwrap();
        assert_eq!(
            translator.usage(),
            Some(TokenUsage {
                prompt: 82,
                completion: 37
            })
        );
    }

    #[test]
    fn a_length_finish_is_an_incomplete_response() {
        for (finish, reason) in [
            ("length", "max_output_tokens"),
            ("content_filter", "content_filter"),
        ] {
            let stream = chat_stream(
                &[
                    (json!({"content": "Once upon"}), None),
                    (json!({}), Some(finish)),
                ],
                &[],
                true,
            );
            let (result, events) = translate(&stream);
            result.unwrap();
            assert_eq!(events.last().unwrap().0, "response.completed");
            let response = last(&events);
            assert_eq!(response["status"], "incomplete");
            assert_eq!(response["incomplete_details"], json!({"reason": reason}));
            assert_eq!(response["output"][0]["status"], "incomplete");
        }
    }

    #[test]
    fn a_backend_error_mid_stream_fails_the_response_and_ends_it() {
        let mut stream = chat_stream(&[(json!({"content": "Half"}), None)], &[], false);
        stream.extend_from_slice(
            b"data: {\"error\":{\"message\":\"CUDA out of memory\",\"code\":500}}\n\n",
        );
        // What follows the failure is not said.
        stream.extend_from_slice(&chat_stream(
            &[(json!({"content": " more"}), Some("stop"))],
            &[],
            true,
        ));
        let (result, events) = translate(&stream);
        result.unwrap();
        assert_eq!(
            kinds(&events)[2..],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.failed",
            ]
        );
        let failed = last(&events);
        assert_eq!(failed["status"], "failed");
        assert_eq!(
            failed["error"],
            json!({"code": "server_error", "message": "CUDA out of memory"})
        );
        assert_eq!(failed["output"][0]["status"], "incomplete");
        assert_eq!(failed["output"][0]["content"][0]["text"], "Half");
    }

    #[test]
    fn a_stream_that_ends_early_fails_the_response() {
        let stream = chat_stream(
            &[(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{\"a\""}}]}),
                None,
            )],
            &[],
            false,
        );
        let (result, events) = translate(&stream);
        assert!(result.unwrap_err().0.contains("ended before its answer"));
        assert_eq!(
            kinds(&events)[2..],
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.failed",
            ]
        );
        let failed = last(&events);
        assert_eq!(failed["output"][0]["arguments"], "{\"a\"");
        assert_eq!(failed["output"][0]["status"], "incomplete");
        assert!(failed["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("The backend's stream is malformed"));
        // Nothing at all from the backend: still created, then failed.
        let (result, events) = translate(b"");
        assert!(result.is_err());
        assert_eq!(kinds(&events)[2..], ["response.failed"]);
    }

    #[test]
    fn malformed_output_fails_the_response_with_what_was_wrong() {
        let mut stream = chat_stream(&[(json!({"content": "a"}), None)], &[], false);
        stream.extend_from_slice(b"data: {not json\n\n");
        let (result, events) = translate(&stream);
        assert!(result.unwrap_err().0.contains("not valid JSON"));
        assert_eq!(events.last().unwrap().0, "response.failed");
        let call = |index: u64| {
            (
                json!({"tool_calls": [{"index": index, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}),
                None,
            )
        };
        let (result, events) = translate(&chat_stream(&[call(1), call(0)], &[], true));
        assert!(result.unwrap_err().0.contains("earlier tool call"));
        assert_eq!(events.last().unwrap().0, "response.failed");
        // After the end, more input says nothing.
        let mut translator = ResponseStream::new(reply());
        let mut out = Vec::new();
        assert!(translator.feed(b"data: [1]\n\n", &mut out).is_err());
        let ended = out.len();
        translator.feed(b"data: {}\n\n", &mut out).unwrap();
        translator.finish(&mut out).unwrap();
        assert_eq!(out.len(), ended);
    }

    #[test]
    fn reasoning_is_dropped_and_a_refusal_is_text() {
        let events = answer(&[
            (json!({"reasoning_content": "thinking"}), None),
            (json!({"refusal": "I can't help with that."}), None),
            (json!({}), Some("stop")),
        ]);
        let output = &last(&events)["output"];
        assert_eq!(output.as_array().unwrap().len(), 1);
        assert_eq!(output[0]["content"][0]["text"], "I can't help with that.");
    }
}
