//! `jairouter-render info`: one fact about a configuration for a script (`./build.sh up`), so
//! the script asks the renderer instead of parsing what it renders.

use crate::flags::{once, Command, UsageError};
use jairouter_filter::plan::Plan;

pub const COMMAND: Command = Command {
    name: "info",
    operands: &["FILE", "QUESTION"],
    flags: &[once("api-keys"), once("port")],
    usage: "FILE [--api-keys KEYS] [--port N] port|model|global-rate-limit",
};

/// What a script may ask. The answer is one line on stdout, or nothing when the configuration
/// has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// The API listener's port, as `bootstrap` renders it given the same `--port`.
    Port,
    /// A model to try a request with: the first of the first service (chat comes first).
    Model,
    /// `gateway.global-rate-limit.address`, as `HOST:PORT` (an IPv6 host in brackets).
    GlobalRateLimit,
}

impl Question {
    pub fn parse(text: &str) -> Result<Question, UsageError> {
        match text {
            "port" => Ok(Question::Port),
            "model" => Ok(Question::Model),
            "global-rate-limit" => Ok(Question::GlobalRateLimit),
            other => Err(UsageError(format!(
                "info: unknown question {other}\n{}",
                COMMAND.usage_line()
            ))),
        }
    }
}

/// The answer to `question` about `router`, whose API listener listens on `port`.
pub fn answer(question: Question, router: &Plan, port: u16) -> Option<String> {
    match question {
        Question::Port => Some(port.to_string()),
        Question::Model => router.instances().next().map(|i| i.spec.name.clone()),
        Question::GlobalRateLimit => router
            .spec
            .gateway
            .global_rate_limit
            .as_ref()
            .map(|global| {
                let url = &global.service;
                if url.host.contains(':') {
                    format!("[{}]:{}", url.host, url.port)
                } else {
                    format!("{}:{}", url.host, url.port)
                }
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(model: serde_json::Value) -> Plan {
        Plan::from_value(&model).unwrap()
    }

    #[test]
    fn questions_are_named_or_refused() {
        assert_eq!(Question::parse("port"), Ok(Question::Port));
        assert_eq!(Question::parse("model"), Ok(Question::Model));
        assert_eq!(
            Question::parse("global-rate-limit"),
            Ok(Question::GlobalRateLimit)
        );
        let refused = Question::parse("ports").unwrap_err();
        assert!(
            refused.0.contains("unknown question ports"),
            "{}",
            refused.0
        );
        assert!(refused.0.contains("usage: jairouter-render info FILE"));
    }

    #[test]
    fn the_model_is_the_chat_services_first() {
        let router = plan(json!({"services": {
            "embedding": {"instances": [{"name": "embed", "base-url": "http://e:1"}]},
            "chat": {"instances": [
                {"name": "llama", "base-url": "http://a:1"},
                {"name": "qwen", "base-url": "http://b:1"}
            ]}
        }}));
        assert_eq!(
            answer(Question::Model, &router, 8080).as_deref(),
            Some("llama")
        );
        let embeddings_only = plan(json!({"services": {
            "embedding": {"instances": [{"name": "embed", "base-url": "http://e:1"}]}
        }}));
        assert_eq!(
            answer(Question::Model, &embeddings_only, 8080).as_deref(),
            Some("embed")
        );
        assert_eq!(answer(Question::Model, &plan(json!({})), 8080), None);
    }

    #[test]
    fn the_port_is_the_listeners() {
        assert_eq!(
            answer(Question::Port, &plan(json!({})), 18080).as_deref(),
            Some("18080")
        );
    }

    #[test]
    fn the_global_rate_limit_is_its_address_or_nothing() {
        let service = |address: &str| {
            plan(json!({
                "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}},
                "gateway": {"global-rate-limit": {"address": address}}
            }))
        };
        let answer_for = |router: &Plan| answer(Question::GlobalRateLimit, router, 8080);
        assert_eq!(
            answer_for(&service("127.0.0.1:8081")).as_deref(),
            Some("127.0.0.1:8081")
        );
        assert_eq!(
            answer_for(&service("ratelimit.infra:8081")).as_deref(),
            Some("ratelimit.infra:8081")
        );
        assert_eq!(
            answer_for(&service("[::1]:8081")).as_deref(),
            Some("[::1]:8081")
        );
        assert_eq!(answer_for(&plan(json!({}))), None);
    }
}
