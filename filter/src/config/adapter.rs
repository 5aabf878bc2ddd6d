//! `adapter:` names (global, per service, per instance) and `adapter-definitions`: what protocol
//! an instance speaks, what it can serve, and the headers its adapter adds. Resolved while the
//! configuration is read, so every instance carries its adapter and a typo is refused with its
//! key.

use super::reader::{self, error, Fields};
use super::{parse_headers, Result};
use crate::endpoint::ServiceType;
use serde_json::Value;

/// The wire protocol of a backend, defined beside its translators (`translate/`), which say
/// what each protocol serves.
pub use crate::translate::Protocol;

/// An instance's adapter, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The name the configuration gave (lower case), for messages and the model list.
    pub name: String,
    pub protocol: Protocol,
    /// The service types it serves.
    pub capabilities: Vec<ServiceType>,
    /// Headers it adds to every upstream request (an instance's own `headers` win).
    pub headers: Vec<(String, String)>,
    /// GPUStack answers errors as `{status_code, detail}`: rewritten as OpenAI errors.
    pub rewrites_errors: bool,
    /// The backend serves OpenAI's Responses API itself (`capabilities: {responses: true}`, or
    /// an instance's `responses: native`): `/v1/responses` passes through to it untouched.
    /// Otherwise it is translated to chat completions, which every OpenAI-compatible backend
    /// serves (most self-hosted ones serve nothing else).
    pub serves_responses: bool,
}

impl Adapter {
    pub fn serves(&self, kind: ServiceType) -> bool {
        self.capabilities.contains(&kind)
    }

    /// The adapter of every instance that names none.
    pub fn normal() -> Adapter {
        builtin("normal").unwrap_or(Adapter {
            name: "normal".into(),
            protocol: Protocol::OpenAi,
            capabilities: ServiceType::ALL.to_vec(),
            headers: Vec::new(),
            rewrites_errors: false,
            serves_responses: false,
        })
    }
}

/// The version of the Messages API the claude adapter speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The original's built-in adapters (looked up case-insensitively).
fn builtin(name: &str) -> Option<Adapter> {
    let (protocol, rewrites_errors, headers) = match name {
        "normal" | "openai" | "vllm" | "xinference" | "localai" => {
            (Protocol::OpenAi, false, vec![])
        }
        "gpustack" => (Protocol::OpenAi, true, vec![]),
        "claude" | "anthropic" => (
            Protocol::Anthropic,
            false,
            vec![(
                "anthropic-version".to_string(),
                ANTHROPIC_VERSION.to_string(),
            )],
        ),
        "gemini" => (Protocol::Gemini, false, vec![]),
        "ollama" => (Protocol::Ollama, false, vec![]),
        _ => return None,
    };
    Some(Adapter {
        name: name.to_string(),
        protocol,
        capabilities: protocol.services().to_vec(),
        headers,
        rewrites_errors,
        serves_responses: false,
    })
}

/// The built-in adapters and the `adapter-definitions`, by name.
#[derive(Debug, Clone, Default)]
pub struct AdapterTable {
    defined: Vec<Adapter>,
}

impl AdapterTable {
    /// The adapter called `name`; `path` is the key that named it, for the refusal.
    pub fn resolve(&self, path: &str, name: &str) -> Result<Adapter> {
        let name = name.trim().to_ascii_lowercase();
        if let Some(adapter) = self.defined.iter().find(|a| a.name == name) {
            return Ok(adapter.clone());
        }
        builtin(&name).ok_or_else(|| {
            let mut known: Vec<&str> = BUILTIN_NAMES.to_vec();
            known.extend(self.defined.iter().map(|a| a.name.as_str()));
            error(
                path,
                format!("unknown adapter `{name}` (known: {})", known.join(", ")),
            )
        })
    }

    /// Reads `adapter-definitions`: a mapping of name to `{type, parent, capabilities, auth,
    /// additional-headers}`. An `extend` may name a built-in or another definition (in any
    /// order); a cycle is refused.
    pub fn parse(path: &str, value: &Value) -> Result<AdapterTable> {
        let map = value
            .as_object()
            .ok_or_else(|| error(path, "must be a mapping of adapter name to definition"))?;
        let mut pending: Vec<Definition> = Vec::with_capacity(map.len());
        for (name, definition) in map {
            let dpath = reader::join(path, name);
            let normal = name.trim().to_ascii_lowercase();
            if normal.is_empty() {
                return Err(error(&dpath, "an adapter needs a name"));
            }
            if builtin(&normal).is_some() {
                return Err(error(
                    &dpath,
                    "is a built-in adapter; give yours another name",
                ));
            }
            pending.push(Definition::parse(&dpath, normal, definition)?);
        }
        let mut table = AdapterTable::default();
        // Each pass settles the definitions whose parent is known; one that never settles is
        // part of a cycle or names an unknown parent.
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::with_capacity(pending.len());
            for definition in pending {
                match definition.settle(&table) {
                    Some(adapter) => table.defined.push(adapter),
                    None => rest.push(definition),
                }
            }
            if rest.len() == before {
                let stuck = rest.first().map(|d| (d.path.clone(), d.parent.clone()));
                let (dpath, parent) = stuck.unwrap_or_default();
                let known = rest.iter().any(|d| Some(&d.name) == parent.as_ref());
                let why = if known {
                    "extends itself through its parents (a cycle)".to_string()
                } else {
                    format!("parent `{}` is not an adapter", parent.unwrap_or_default())
                };
                return Err(error(&reader::join(&dpath, "parent"), why));
            }
            pending = rest;
        }
        Ok(table)
    }
}

const BUILTIN_NAMES: [&str; 10] = [
    "normal",
    "openai",
    "gpustack",
    "vllm",
    "xinference",
    "localai",
    "claude",
    "anthropic",
    "gemini",
    "ollama",
];

/// One entry of `adapter-definitions`, before its parent is known.
struct Definition {
    path: String,
    name: String,
    /// `Some` for `type: extend`.
    parent: Option<String>,
    protocol: Protocol,
    capabilities: Option<Capabilities>,
    headers: Vec<(String, String)>,
}

impl Definition {
    fn parse(path: &str, name: String, value: &Value) -> Result<Definition> {
        let mut f = Fields::new(path, value)?;
        let kind = f.string("type")?.unwrap_or("openai-compatible");
        let parent = f.string("parent")?.map(|p| p.trim().to_ascii_lowercase());
        let (protocol, parent) = match kind.trim().to_ascii_lowercase().as_str() {
            "openai-compatible" => (Protocol::OpenAi, None),
            "ollama-compatible" => (Protocol::Ollama, None),
            "extend" => match parent {
                Some(p) if !p.is_empty() => (Protocol::OpenAi, Some(p)),
                _ => return Err(error(&f.child("parent"), "is required for type: extend")),
            },
            other => {
                return Err(error(
                    &f.child("type"),
                    format!(
                        "must be openai-compatible, ollama-compatible or extend (got {other:?})"
                    ),
                ))
            }
        };
        let capabilities = match f.take("capabilities") {
            None => None,
            Some(v) => Some(Capabilities::parse(&f.child("capabilities"), v)?),
        };
        if protocol == Protocol::Ollama && capabilities.as_ref().is_some_and(|c| c.responses) {
            return Err(error(
                &reader::join(&f.child("capabilities"), "responses"),
                "only an openai-compatible backend serves the Responses API itself",
            ));
        }
        let mut headers = match f.take("auth") {
            None => Vec::new(),
            Some(v) => parse_auth(&f.child("auth"), v)?,
        };
        if let Some(v) = f.take("additional-headers") {
            headers.extend(parse_headers(&f.child("additional-headers"), v)?);
        }
        f.finish()?;
        Ok(Definition {
            path: path.to_string(),
            name,
            parent,
            protocol,
            capabilities,
            headers,
        })
    }

    /// The adapter, once its parent (if any) is in the table.
    fn settle(&self, table: &AdapterTable) -> Option<Adapter> {
        let parent = match &self.parent {
            None => None,
            Some(name) => Some(table.resolve("", name).ok()?),
        };
        let protocol = parent.as_ref().map_or(self.protocol, |p| p.protocol);
        // Capabilities left out are the parent's, or all the protocol serves (the original
        // defaults every one to false, so an adapter defined without them served nothing).
        let (capabilities, serves_responses) = match (&self.capabilities, &parent) {
            (Some(own), _) => (
                own.services
                    .iter()
                    .copied()
                    .filter(|k| protocol.services().contains(k))
                    .collect(),
                own.responses && protocol == Protocol::OpenAi,
            ),
            (None, Some(p)) => (p.capabilities.clone(), p.serves_responses),
            (None, None) => (protocol.services().to_vec(), false),
        };
        let mut headers = parent
            .as_ref()
            .map(|p| p.headers.clone())
            .unwrap_or_default();
        for (name, value) in &self.headers {
            headers.retain(|(n, _)| n != name);
            headers.push((name.clone(), value.clone()));
        }
        Some(Adapter {
            name: self.name.clone(),
            protocol,
            capabilities,
            headers,
            rewrites_errors: parent.is_some_and(|p| p.rewrites_errors),
            serves_responses,
        })
    }
}

/// What a definition's `capabilities` say it serves.
struct Capabilities {
    services: Vec<ServiceType>,
    /// `responses: true`: OpenAI's Responses API, itself.
    responses: bool,
}

impl Capabilities {
    /// `capabilities: {chat, embedding, rerank, tts, stt, imgGen, imgEdit, streaming,
    /// responses}`; each true service is served. `streaming` is accepted: a streamed answer is
    /// served wherever chat is.
    fn parse(path: &str, value: &Value) -> Result<Capabilities> {
        let mut f = Fields::new(path, value)?;
        let responses = f.boolean("responses", false)?;
        let services = parse_services(f)?;
        Ok(Capabilities {
            services,
            responses,
        })
    }
}

/// The service types of `capabilities` (the rest of its keys).
fn parse_services(mut f: Fields<'_>) -> Result<Vec<ServiceType>> {
    let mut served = Vec::new();
    for (key, kind) in [
        ("chat", ServiceType::Chat),
        ("embedding", ServiceType::Embedding),
        ("rerank", ServiceType::Rerank),
        ("tts", ServiceType::Tts),
        ("stt", ServiceType::Stt),
        ("img-gen", ServiceType::ImgGen),
        ("img-edit", ServiceType::ImgEdit),
    ] {
        if f.boolean(key, false)? {
            served.push(kind);
        }
    }
    f.boolean("streaming", true)?;
    f.finish()?;
    Ok(served)
}

/// `auth: {header-name, header-prefix, api-key}`: the backend's credential, sent as
/// `<header-name>: <header-prefix><api-key>` (without `api-key`, nothing is sent: an instance's
/// `headers` carry it instead).
fn parse_auth(path: &str, value: &Value) -> Result<Vec<(String, String)>> {
    let mut f = Fields::new(path, value)?;
    let name = f.string("header-name")?.unwrap_or("Authorization");
    let prefix = f.string("header-prefix")?.unwrap_or("Bearer ");
    let key = f.string("api-key")?;
    f.finish()?;
    let Some(key) = key else {
        return Ok(Vec::new());
    };
    let mut header = serde_json::Map::new();
    header.insert(name.to_string(), Value::String(format!("{prefix}{key}")));
    parse_headers(&reader::join(path, "header-name"), &Value::Object(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn built_ins_resolve_case_insensitively_and_typos_are_refused() {
        let table = AdapterTable::default();
        let claude = table.resolve("model.adapter", "Claude").unwrap();
        assert_eq!(claude.protocol, Protocol::Anthropic);
        assert_eq!(claude.capabilities, vec![ServiceType::Chat]);
        assert!(claude.headers.iter().any(|(n, _)| n == "anthropic-version"));
        assert!(table.resolve("x", "gpustack").unwrap().rewrites_errors);
        let err = table
            .resolve("model.adapter", "olama")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.adapter") && err.contains("unknown adapter `olama`"),
            "{err}"
        );
    }

    #[test]
    fn definitions_extend_in_any_order_and_cycles_are_refused() {
        let table = AdapterTable::parse(
            "adapter-definitions",
            &json!({
                "child": {"type": "extend", "parent": "mine", "additionalHeaders": {"x-b": "2"}},
                "mine": {"type": "ollama-compatible", "capabilities": {"chat": true, "rerank": true},
                         "auth": {"header-name": "X-Key", "header-prefix": "", "api-key": "k"}}
            }),
        )
        .unwrap();
        let child = table.resolve("p", "child").unwrap();
        assert_eq!(child.protocol, Protocol::Ollama);
        // Ollama has no rerank to translate to: the capability is dropped.
        assert_eq!(child.capabilities, vec![ServiceType::Chat]);
        assert_eq!(
            child.headers,
            vec![
                ("x-key".to_string(), "k".to_string()),
                ("x-b".to_string(), "2".to_string())
            ]
        );
        let cycle = AdapterTable::parse(
            "adapter-definitions",
            &json!({"a": {"type": "extend", "parent": "b"}, "b": {"type": "extend", "parent": "a"}}),
        )
        .unwrap_err()
        .to_string();
        assert!(cycle.contains("cycle"), "{cycle}");
        let unknown = AdapterTable::parse(
            "adapter-definitions",
            &json!({"a": {"type": "extend", "parent": "nope"}}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            unknown.contains("adapter-definitions.a.parent"),
            "{unknown}"
        );
        let shadow = AdapterTable::parse("adapter-definitions", &json!({"claude": {}}))
            .unwrap_err()
            .to_string();
        assert!(shadow.contains("built-in"), "{shadow}");
    }

    #[test]
    fn a_definition_without_capabilities_serves_what_its_protocol_can() {
        let table =
            AdapterTable::parse("d", &json!({"deepseek": {"type": "openai-compatible"}})).unwrap();
        let adapter = table.resolve("p", "deepseek").unwrap();
        assert_eq!(adapter.capabilities, ServiceType::ALL.to_vec());
        let none = AdapterTable::parse("d", &json!({"x": {"capabilities": {}}})).unwrap();
        assert!(none.resolve("p", "x").unwrap().capabilities.is_empty());
    }
}
