//! Whole cases of every translator, as files: `fixtures/<translator>/<case>.in.<ext>` is what one
//! side sends (a client's request, a backend's answer or stream) and `<case>.out.<ext>` what the
//! other side gets. The runner sends each through the translator the dispatch picks
//! ([`super::translator`]), as the exchange does, and compares JSON as JSON (key order aside)
//! and streams event by event; a stream must translate the same cut at every byte.
//!
//! Every file under `fixtures/` is a case of [`CASES`] (a test says so). A new case's `.out` can
//! be written by the translator (`BLESS=1 cargo test -p jairouter-filter fixtures`), and is then
//! read as what it is: the expectation.

use super::frames::same_under_any_chunking;
use super::Protocol;
use super::{translator, ReplyContext, Translator};
use crate::endpoint::Endpoint;
use serde_json::Value;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// What a case sends through its translator.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// The client's request body, to the backend's.
    Request,
    /// The backend's whole answer, to the client's.
    Answer,
    /// The backend's stream, to the client's; `usage`: the client asked for a usage chunk.
    Stream { usage: bool },
}

struct Case {
    dir: &'static str,
    name: &'static str,
    kind: Kind,
    endpoint: Endpoint,
    input: &'static str,
    expected: &'static str,
}

/// The translator of a fixture directory: the endpoint its client calls, the backend's
/// protocol, the model asked of the instance and the model the answer is labelled with.
fn context(dir: &str) -> (Endpoint, Protocol, &'static str, &'static str) {
    match dir {
        "openai_to_claude" => (
            Endpoint::ChatCompletions,
            Protocol::Anthropic,
            "claude-sonnet-4-5",
            "claude",
        ),
        "openai_to_gemini" => (
            Endpoint::ChatCompletions,
            Protocol::Gemini,
            "gemini-2.5-flash",
            "gemini-2.5-flash",
        ),
        "openai_to_ollama" => (
            Endpoint::ChatCompletions,
            Protocol::Ollama,
            "llama3.2",
            "llama3.2",
        ),
        "messages_to_openai" => (
            Endpoint::Messages,
            Protocol::OpenAi,
            "qwen3:8b",
            "claude-sonnet-4-5",
        ),
        "responses_to_openai" => (Endpoint::Responses, Protocol::OpenAi, "qwen3:8b", "gpt-4.1"),
        other => panic!("no translator for fixtures/{other}"),
    }
}

/// The translator of a fixture directory: the one the dispatch picks.
fn translator_of(dir: &str) -> &'static dyn Translator {
    let (endpoint, protocol, _, _) = context(dir);
    translator(endpoint, protocol).unwrap()
}

macro_rules! case {
    ($dir:literal, $name:literal, $kind:expr, $endpoint:expr, $in:literal, $out:literal) => {
        Case {
            dir: $dir,
            name: $name,
            kind: $kind,
            endpoint: $endpoint,
            input: include_str!(concat!("fixtures/", $dir, "/", $name, ".in.", $in)),
            expected: include_str!(concat!("fixtures/", $dir, "/", $name, ".", $out)),
        }
    };
}

/// A request and an answer of the translator's chat endpoint.
macro_rules! chat {
    ($dir:literal, $name:literal, $kind:ident) => {
        case!(
            $dir,
            $name,
            Kind::$kind,
            context($dir).0,
            "json",
            "out.json"
        )
    };
}

/// A stream, translated for a client that asked no usage chunk (`.out.sse`) and for one that
/// did (`.usage.out.sse`).
macro_rules! stream {
    ($dir:literal, $name:literal, $in:literal) => {
        [
            case!(
                $dir,
                $name,
                Kind::Stream { usage: false },
                context($dir).0,
                $in,
                "out.sse"
            ),
            case!(
                $dir,
                $name,
                Kind::Stream { usage: true },
                context($dir).0,
                $in,
                "usage.out.sse"
            ),
        ]
    };
}

fn cases() -> Vec<Case> {
    let embeddings = Endpoint::Embeddings;
    let mut cases = vec![
        chat!("openai_to_claude", "request-system-lifted", Request),
        chat!("openai_to_claude", "request-tools", Request),
        // The example answer of the Messages API reference.
        chat!("openai_to_claude", "answer-text", Answer),
        chat!("openai_to_claude", "answer-tool-use", Answer),
        chat!("openai_to_gemini", "request-chat", Request),
        chat!("openai_to_gemini", "request-tools", Request),
        // The generateContent reference's text answer, with a thinking model's usage.
        chat!("openai_to_gemini", "answer-text", Answer),
        chat!("openai_to_gemini", "answer-tool-calls", Answer),
        case!(
            "openai_to_gemini",
            "answer-embed",
            Kind::Answer,
            embeddings,
            "json",
            "out.json"
        ),
        chat!("openai_to_ollama", "request-chat", Request),
        // The structured-outputs answer of Ollama's docs/api.md, with a thinking model's
        // `thinking`.
        chat!("openai_to_ollama", "answer-text", Answer),
        chat!("openai_to_ollama", "answer-tool-calls", Answer),
        // The first example of Anthropic's Messages reference.
        chat!("messages_to_openai", "request-plain", Request),
        chat!("messages_to_openai", "request-sampling", Request),
        // Anthropic's tool use example, the way Claude Code sends it: tools, an assistant turn
        // with text and a tool_use, then the user's tool_result followed by more text.
        chat!("messages_to_openai", "request-tools", Request),
        // The first example of OpenAI's chat completions reference.
        chat!("messages_to_openai", "answer-text", Answer),
        // OpenAI's function calling answer.
        chat!("messages_to_openai", "answer-tool-use", Answer),
        // The text input example of OpenAI's Responses reference.
        chat!("responses_to_openai", "request-text", Request),
        // What Codex sends: instructions, a developer message, its hints (dropped), a stream.
        chat!("responses_to_openai", "request-instructions", Request),
        // The function calling example of the Responses reference, one tool forced.
        chat!("responses_to_openai", "request-tools", Request),
        // The next turn: two calls (one assistant message) and their outputs sent back.
        chat!("responses_to_openai", "request-tool-round-trip", Request),
        // The structured outputs example of the Responses reference.
        chat!("responses_to_openai", "request-json-schema", Request),
        // The image input example of the Responses reference, and a data: URL.
        chat!("responses_to_openai", "request-image", Request),
        // The first example of OpenAI's chat completions reference, with usage details.
        chat!("responses_to_openai", "answer-text", Answer),
        // OpenAI's function calling answer, with two parallel calls.
        chat!("responses_to_openai", "answer-tool-calls", Answer),
        // Cut short by max_tokens: an incomplete Response.
        chat!("responses_to_openai", "answer-length", Answer),
    ];
    // The basic streaming example of Anthropic's streaming documentation, and its tool-use
    // example (a text block, then a tool_use block whose input arrives as input_json_delta
    // pieces) with a thinking block before them.
    cases.extend(stream!("openai_to_claude", "stream-text", "sse"));
    cases.extend(stream!("openai_to_claude", "stream-tools", "sse"));
    cases.extend(stream!("openai_to_gemini", "stream-text", "sse"));
    cases.extend(stream!("openai_to_ollama", "stream-text", "ndjson"));
    // An Anthropic client always gets the usage: there is no usage chunk to ask for.
    let no_usage = Kind::Stream { usage: false };
    let messages = context("messages_to_openai").0;
    cases.push(case!(
        "messages_to_openai",
        "stream-text",
        no_usage,
        messages,
        "sse",
        "out.sse"
    ));
    // A Responses client always gets the usage, in response.completed.
    let responses = context("responses_to_openai").0;
    for case in [
        case!(
            "responses_to_openai",
            "stream-text",
            no_usage,
            responses,
            "sse",
            "out.sse"
        ),
        case!(
            "responses_to_openai",
            "stream-tools",
            no_usage,
            responses,
            "sse",
            "out.sse"
        ),
    ] {
        cases.push(case);
    }
    cases
}

/// A stream as its events: each `event:` name (empty when none) and its data, JSON parsed
/// (`[DONE]` as a string).
fn events(text: &str) -> Vec<(String, Value)> {
    assert!(text.ends_with("\n\n"), "unterminated event: {text}");
    text.split_terminator("\n\n")
        .map(|event| {
            let mut name = String::new();
            let mut data = String::new();
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_string();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value.to_string();
                } else {
                    panic!("not an event line: {line:?}");
                }
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            (name, data)
        })
        .collect()
}

/// What the translator makes of the case's input, as text.
fn translate(case: &Case, translator: &dyn Translator) -> String {
    let (_, _, model, reply_model) = context(case.dir);
    let reply = |include_usage| ReplyContext {
        model: reply_model.into(),
        created: 1_700_000_000,
        include_usage,
        nonce: 0,
    };
    match case.kind {
        Kind::Request => {
            let request = super::parse_request(case.input.as_bytes()).unwrap();
            let body = translator.request(case.endpoint, &request, model).unwrap();
            serde_json::to_string_pretty(&body).unwrap() + "\n"
        }
        Kind::Answer => {
            let body = translator
                .answer(case.endpoint, case.input.as_bytes(), &reply(false))
                .unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            serde_json::to_string_pretty(&body).unwrap() + "\n"
        }
        Kind::Stream { usage } => {
            let new = || Streamed(translator.stream(reply(usage)));
            let out = same_under_any_chunking(new, case.input.as_bytes()).unwrap();
            String::from_utf8(out).unwrap()
        }
    }
}

/// A boxed stream translator, for the chunking check's `impl StreamTranslator`.
struct Streamed(Box<dyn super::StreamTranslator>);

impl super::StreamTranslator for Streamed {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), super::Malformed> {
        self.0.feed(chunk, out)
    }
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), super::Malformed> {
        self.0.finish(out)
    }
}

#[test]
fn every_case_translates_to_what_its_out_file_says() {
    for case in cases() {
        let out = translate(&case, translator_of(case.dir));
        #[cfg(not(target_arch = "wasm32"))]
        if std::env::var("BLESS").is_ok_and(|v| v == "1") {
            let out_file = match case.kind {
                Kind::Stream { usage: false } => "out.sse",
                Kind::Stream { usage: true } => "usage.out.sse",
                Kind::Request | Kind::Answer => "out.json",
            };
            let path = format!(
                "{}/src/translate/fixtures/{}/{}.{out_file}",
                env!("CARGO_MANIFEST_DIR"),
                case.dir,
                case.name,
            );
            std::fs::write(path, &out).unwrap();
            continue;
        }
        let what = format!("fixtures/{}/{}", case.dir, case.name);
        match case.kind {
            Kind::Stream { .. } => {
                assert_eq!(events(&out), events(case.expected), "{what}");
            }
            Kind::Request | Kind::Answer => {
                let expected: Value = serde_json::from_str(case.expected).unwrap();
                let out: Value = serde_json::from_str(&out).unwrap();
                assert_eq!(out, expected, "{what}");
            }
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn every_fixture_file_is_a_case() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src/translate/fixtures");
    let mut files = Vec::new();
    for dir in std::fs::read_dir(root).unwrap() {
        let dir = dir.unwrap();
        let name = dir.file_name().into_string().unwrap();
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let file = file.unwrap().file_name().into_string().unwrap();
            files.push(format!("{name}/{file}"));
        }
    }
    files.sort();
    let mut listed: Vec<String> = Vec::new();
    for case in cases() {
        let out = match case.kind {
            Kind::Stream { usage: true } => "usage.out",
            _ => "out",
        };
        for (side, text) in [("in", case.input), (out, case.expected)] {
            let prefix = format!("{}/{}.{side}.", case.dir, case.name);
            let file = files.iter().find(|f| f.starts_with(&prefix));
            let file = file.unwrap_or_else(|| panic!("no file {prefix}*"));
            let on_disk = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            assert_eq!(on_disk, text, "{file}");
            listed.push(file.clone());
        }
    }
    listed.sort();
    listed.dedup();
    assert_eq!(files, listed, "files under fixtures/ that no case reads");
}
