//! The mesh deployments: the same filter inside an Istio gateway or sidecar (`istio`) and inside
//! Envoy Gateway (`envoy-gateway`), rendered from the same application.yml.
//!
//! In a mesh the control plane owns Envoy's clusters, so instead of one cluster per instance the
//! renderer writes the mesh's own resources: a route per instance that matches the filter's
//! choice (`x-jairouter-cluster: <Instance::cluster>`) and sends the request to the instance's
//! host and port, the definitions of backends outside the cluster, TLS to https backends, and
//! the mesh's health checking. The filter itself is unchanged: it gets the same JSON
//! configuration `plugin-config` prints.

mod envoy_gateway;
mod istio;

use crate::app_config;
use crate::flags::Args;
use jairouter_filter::config::EdgeLimits;
use jairouter_filter::plan::{Instance, Plan, Service};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The answer of the last route, reached only by requests the filter did not route (it always
/// names an instance or answers itself): the same OpenAI-shaped 503 as the standalone gateway's.
pub const UNROUTED_BODY: &str = r#"{"error":{"message":"The routing filter did not choose an instance.","type":"server_error","param":null,"code":"gateway_unavailable"}}"#;

/// What a backend retries, as the standalone gateway does: refused or reset connections, 5xx,
/// and 429 (a backend's own limit should move traffic rather than reach the client).
pub const RETRY_ON: [&str; 4] = ["connect-failure", "refused-stream", "reset", "5xx"];
pub const RETRIABLE_STATUS: u16 = 429;

/// Labels on every object, so `kubectl get/delete -l app.kubernetes.io/name=jairouter` finds them.
pub fn labels() -> Value {
    json!({
        "app.kubernetes.io/name": "jairouter",
        "app.kubernetes.io/managed-by": "jairouter-render"
    })
}

pub fn metadata(name: &str, namespace: &str) -> Value {
    json!({"name": name, "namespace": namespace, "labels": labels()})
}

/// `jairouter-render istio|envoy-gateway FILE [flags]`: `args` as parsed by the command's
/// grammar (`istio::COMMAND`, `envoy_gateway::COMMAND`), `line` the whole command line (named in
/// the rendered YAML's header).
pub fn command(command: &str, args: &Args, line: &[String]) -> Result<(), String> {
    let file = args.operand(0);
    let (filter_config, router) = load(file, args.one("api-keys"))?;
    for note in unsupported_in_mesh(&router) {
        eprintln!("jairouter-render: note: {note}");
    }
    let documents = match command {
        "istio" => istio::render(&router, &filter_config, &istio::Options::from_flags(args)?)?,
        "envoy-gateway" => envoy_gateway::render(
            &router,
            &filter_config,
            &envoy_gateway::Options::from_flags(args)?,
        )?,
        other => return Err(format!("{other}: not a mesh command")),
    };
    print!("{}", to_yaml(&command_line(line), &documents)?);
    Ok(())
}

pub use envoy_gateway::COMMAND as ENVOY_GATEWAY;
pub use istio::COMMAND as ISTIO;

/// The filter's configuration (what `plugin-config` prints) and what it compiles to.
fn load(file: &str, api_keys: Option<&str>) -> Result<(Value, Plan), String> {
    let filter_config = app_config::load_files(file, api_keys)?.filter_config();
    let router = Plan::from_value(&filter_config).map_err(|e| format!("{file}: {e}"))?;
    Ok((filter_config, router))
}

/// Settings that need filters of the standalone bootstrap beside ours, which a mesh does not get.
fn unsupported_in_mesh(router: &Plan) -> Vec<&'static str> {
    let mut notes = Vec::new();
    if router.spec.gateway.jwt.is_some() {
        notes.push(
            "gateway.jwt needs Envoy's jwt_authn in front of the filter, which the mesh \
             resources do not add: tokens will be refused (use API keys, or verify tokens with \
             the mesh's own JWT policy)",
        );
    }
    if router.spec.gateway.global_rate_limit.is_some() {
        notes.push(
            "gateway.global-rate-limit is a bootstrap filter: in a mesh use the mesh's global \
             rate limiting (limits in the filter stay per proxy pod)",
        );
    }
    if router.spec.gateway.edge != EdgeLimits::DEFAULT {
        notes.push(
            "gateway.max-connections and the gateway's timeouts and header limits are \
             settings of the standalone bootstrap's listener, which the mesh owns: set them on \
             the mesh's gateway or proxy configuration",
        );
    }
    notes
}

/// Where the filter's .wasm comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WasmSource {
    /// An OCI image (`oci://registry/repo:tag`) holding `plugin.wasm` at its root.
    Oci(String),
    /// A module served over HTTP(S).
    Http(String),
    /// A file inside the proxy container (Istio only; for tests and air-gapped nodes).
    File(String),
}

pub struct Wasm {
    pub source: WasmSource,
    /// For an image the image's digest, for HTTP the module's (64 hex digits).
    pub sha256: Option<String>,
}

impl Wasm {
    pub fn from_flags(flags: &Args) -> Result<Wasm, String> {
        let url = flags
            .one("wasm-url")
            .ok_or("--wasm-url URL is required (oci://..., https://... or file://...)")?;
        let source = if url.starts_with("oci://") {
            WasmSource::Oci(url.to_string())
        } else if url.starts_with("https://") || url.starts_with("http://") {
            WasmSource::Http(url.to_string())
        } else if let Some(path) = url.strip_prefix("file://") {
            WasmSource::File(path.to_string())
        } else {
            return Err(format!(
                "--wasm-url {url}: must start with oci://, https://, http:// or file://"
            ));
        };
        let sha256 = match flags.one("wasm-sha256") {
            None => None,
            Some(hex)
                if hex.len() == 64
                    && hex
                        .chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) =>
            {
                Some(hex.to_string())
            }
            Some(hex) => return Err(format!("--wasm-sha256 {hex}: not 64 lowercase hex digits")),
        };
        Ok(Wasm { source, sha256 })
    }

    pub fn url(&self) -> String {
        match &self.source {
            WasmSource::Oci(url) | WasmSource::Http(url) => url.clone(),
            WasmSource::File(path) => format!("file://{path}"),
        }
    }
}

/// Where a base-url's host lives, as the mesh sees it. The rule: a name without a dot is a
/// Service in the rendered namespace (`http://ollama:11434`, as in-cluster DNS resolves it);
/// `NAME.NS.svc` and `NAME.NS.svc.<cluster domain>` are Services in NS; anything else (a dotted
/// name such as `api.openai.com`, or an IP address) is outside the mesh. `NAME.NS` is read as an
/// outside name (it cannot be told apart from `openai.com`): write in-cluster hosts with `.svc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    InCluster {
        service: String,
        namespace: String,
        /// `NAME.NS.svc.cluster.local` (or the cluster domain the host named).
        fqdn: String,
    },
    External {
        host: String,
        ip: bool,
    },
}

pub fn place(host: &str, namespace: &str) -> Place {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Place::External {
            host: host.to_string(),
            ip: true,
        };
    }
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [service] => Place::InCluster {
            service: service.to_string(),
            namespace: namespace.to_string(),
            fqdn: format!("{service}.{namespace}.svc.cluster.local"),
        },
        [service, ns, "svc"] => Place::InCluster {
            service: service.to_string(),
            namespace: ns.to_string(),
            fqdn: format!("{host}.cluster.local"),
        },
        [service, ns, "svc", domain @ ..] if domain.iter().all(|l| !l.is_empty()) => {
            Place::InCluster {
                service: service.to_string(),
                namespace: ns.to_string(),
                fqdn: host.to_string(),
            }
        }
        _ => Place::External {
            host: host.to_string(),
            ip: false,
        },
    }
}

/// One backend host of the configuration with the ports its instances use, grouped the way the
/// mesh names things (an in-cluster host written two ways is one Service).
pub struct Backend<'a> {
    pub place: Place,
    /// The host as the instances' base-urls write it (their `Host` header upstream).
    pub host: String,
    /// Port -> TLS (https) or not.
    pub ports: BTreeMap<u16, bool>,
    pub instances: Vec<&'a Instance>,
}

impl Backend<'_> {
    /// The key backends are grouped and ordered by.
    fn key(place: &Place) -> String {
        match place {
            Place::InCluster { fqdn, .. } => fqdn.clone(),
            Place::External { host, .. } => host.clone(),
        }
    }
}

/// The configuration's backends, one per host (in host order), each with its instances.
pub fn backends<'a>(router: &'a Plan, namespace: &str) -> Result<Vec<Backend<'a>>, String> {
    let mut by_key: BTreeMap<String, Backend<'a>> = BTreeMap::new();
    for instance in router.instances() {
        let url = &instance.spec.base_url;
        let place = place(&url.host, namespace);
        let backend = by_key
            .entry(Backend::key(&place))
            .or_insert_with(|| Backend {
                place,
                host: url.host.clone(),
                ports: BTreeMap::new(),
                instances: Vec::new(),
            });
        if let Some(tls) = backend.ports.insert(url.port, url.tls) {
            if tls != url.tls {
                return Err(format!(
                    "instance {}: {}:{} is used with both http and https",
                    instance.spec.id, url.host, url.port
                ));
            }
        }
        backend.instances.push(instance);
    }
    Ok(by_key.into_values().collect())
}

/// Each instance with the service it belongs to (for its retries), in configuration order.
pub fn instances_with_service(router: &Plan) -> Vec<(&Service, &Instance)> {
    router
        .services()
        .flat_map(|s| s.instances.iter().map(move |i| (s, i)))
        .collect()
}

/// Names of Kubernetes objects (and Gateway API rule names): DNS-1123 labels, at most 63
/// characters. A name that had to be shortened, or that two different things would share, gets
/// a hash of what it names, so names stay stable and distinct.
#[derive(Default)]
pub struct Names {
    taken: HashMap<String, String>,
}

impl Names {
    pub fn name(&mut self, base: &str, key: &str) -> String {
        let mut name = dns_label(base);
        let clash = self.taken.get(&name).is_some_and(|k| k != key);
        if clash || name.len() > 63 {
            let hash = format!("{:08x}", fnv1a(key.as_bytes()) & 0xffff_ffff);
            name.truncate(63 - hash.len() - 1);
            name = format!("{}-{hash}", name.trim_end_matches('-'));
        }
        self.taken.insert(name.clone(), key.to_string());
        name
    }
}

/// Lowercase letters, digits and single hyphens, starting and ending with a letter or digit.
fn dns_label(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() {
        "jairouter".to_string()
    } else {
        trimmed.to_string()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A Gateway API Duration (GEP-2257): up to four of `<1..5 digits>(h|m|s|ms)`, e.g. `1h30m`,
/// `2s500ms`; `0s` for none.
pub fn gateway_api_duration(ms: u64) -> String {
    let parts = [
        (ms / 3_600_000, "h"),
        (ms / 60_000 % 60, "m"),
        (ms / 1000 % 60, "s"),
        (ms % 1000, "ms"),
    ];
    let text: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".to_string()
    } else {
        text
    }
}

/// One YAML document, with comment lines above it (why it is the way it is).
pub struct Document {
    pub comment: String,
    pub value: Value,
}

impl Document {
    pub fn new(value: Value) -> Document {
        Document {
            comment: String::new(),
            value,
        }
    }

    pub fn with_comment(comment: &str, value: Value) -> Document {
        Document {
            comment: comment.to_string(),
            value,
        }
    }
}

/// Multi-document YAML, headed by the command that rendered it (so a committed copy can be
/// re-rendered and compared).
pub fn to_yaml(command_line: &str, documents: &[Document]) -> Result<String, String> {
    let mut out = format!(
        "# Rendered by: {command_line}\n# Edit the JAiRouter configuration and render again rather than editing this file.\n"
    );
    for document in documents {
        out.push_str("---\n");
        for line in document.comment.lines() {
            out.push_str(format!("# {line}").trim_end_matches(' '));
            out.push('\n');
        }
        out.push_str(&serde_yaml::to_string(&document.value).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// `jairouter-render ARGS`, quoted for a POSIX shell where needed.
fn command_line(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./:=@,+-%".contains(c));
            if plain {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect();
    format!("jairouter-render {}", quoted.join(" "))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::flags::Command;

    /// The filter's configuration and its compiled form, from YAML.
    pub fn config(yaml: &str) -> (Value, Plan) {
        let app = app_config::load(yaml, &HashMap::new()).unwrap();
        let value = app.filter_config();
        let router = Plan::from_value(&value).unwrap();
        (value, router)
    }

    /// `args` after `FILE`, read by `command`'s grammar.
    pub fn flags(command: &Command, args: &[&str]) -> Result<Args, String> {
        let line: Vec<String> = std::iter::once("app.yml")
            .chain(args.iter().copied())
            .map(str::to_string)
            .collect();
        command.parse(&line).map_err(|e| e.0)
    }

    /// Every document of a rendering, parsed back.
    pub fn parse(documents: &[Document]) -> Vec<Value> {
        let text = to_yaml("test", documents).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
        docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    #[test]
    fn hosts_inside_and_outside_the_cluster() {
        let inside = |service: &str, namespace: &str, fqdn: &str| Place::InCluster {
            service: service.into(),
            namespace: namespace.into(),
            fqdn: fqdn.into(),
        };
        assert_eq!(
            place("ollama", "llm"),
            inside("ollama", "llm", "ollama.llm.svc.cluster.local")
        );
        assert_eq!(
            place("vllm.models.svc", "llm"),
            inside("vllm", "models", "vllm.models.svc.cluster.local")
        );
        assert_eq!(
            place("vllm.models.svc.cluster.local", "llm"),
            inside("vllm", "models", "vllm.models.svc.cluster.local")
        );
        assert_eq!(
            place("vllm.models.svc.corp.internal", "llm"),
            inside("vllm", "models", "vllm.models.svc.corp.internal")
        );
        for host in [
            "api.openai.com",
            "openai.com",
            "vllm.models",
            "svc.example.com",
        ] {
            assert_eq!(
                place(host, "llm"),
                Place::External {
                    host: host.into(),
                    ip: false
                },
                "{host}"
            );
        }
        for host in ["10.0.0.7", "::1"] {
            assert_eq!(
                place(host, "llm"),
                Place::External {
                    host: host.into(),
                    ip: true
                }
            );
        }
    }

    #[test]
    fn backends_group_hosts_and_refuse_a_port_with_two_schemes() {
        let (_, router) = config(
            r#"
services:
  chat:
    instances:
      - {name: a, base-url: "http://ollama:11434"}
      - {name: b, base-url: "http://ollama.default.svc.cluster.local:11434/v1x"}
      - {name: c, base-url: "https://api.example.com"}
      - {name: d, base-url: "http://api.example.com:8080"}
"#,
        );
        let found = backends(&router, "default").unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].host, "api.example.com");
        assert_eq!(found[0].ports, BTreeMap::from([(443, true), (8080, false)]));
        assert_eq!(found[1].instances.len(), 2);

        let (_, router) = config(
            r#"
services:
  chat:
    instances:
      - {name: a, base-url: "http://h.example.com:8443"}
      - {name: b, base-url: "https://h.example.com:8443"}
"#,
        );
        let error = backends(&router, "default").err().unwrap();
        assert!(error.contains("both http and https"), "{error}");
    }

    #[test]
    fn names_are_dns_labels_stable_and_distinct() {
        let mut names = Names::default();
        assert_eq!(
            names.name("jairouter-api.openai.com", "a"),
            "jairouter-api-openai-com"
        );
        assert_eq!(
            names.name("jairouter-api.openai.com", "a"),
            "jairouter-api-openai-com"
        );
        let other = names.name("jairouter-api-openai.com", "b");
        assert_ne!(other, "jairouter-api-openai-com");
        assert!(other.starts_with("jairouter-api-openai-com-"));
        let long = names.name(&"x".repeat(100), "c");
        assert_eq!(long.len(), 63);
        assert_eq!(names.name("Jairouter_Chat_0", "d"), "jairouter-chat-0");
        assert_eq!(names.name("::", "e"), "jairouter");
    }

    #[test]
    fn durations() {
        assert_eq!(gateway_api_duration(0), "0s");
        assert_eq!(gateway_api_duration(300_000), "5m");
        assert_eq!(gateway_api_duration(2_500), "2s500ms");
        assert_eq!(gateway_api_duration(86_400_000), "24h");
        assert_eq!(gateway_api_duration(5_430_250), "1h30m30s250ms");
    }

    #[test]
    fn edge_limits_are_noted_as_the_mesh_s_business() {
        let yaml = |gateway: &str| {
            format!(
                "model:\n  gateway: {gateway}\n  services:\n    chat:\n      instances:\n        - {{name: m, base-url: \"http://h:1\"}}\n"
            )
        };
        let (_, plain) = config(&yaml("{instance-header: true}"));
        assert!(unsupported_in_mesh(&plain).is_empty());
        let (_, limited) = config(&yaml("{max-connections: 10}"));
        let notes = unsupported_in_mesh(&limited);
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("gateway.max-connections")),
            "{notes:?}"
        );
    }

    #[test]
    fn each_mesh_command_takes_only_its_flags() {
        let f = flags(&ISTIO, &["--host", "a", "--host", "b", "--namespace", "x"]).unwrap();
        assert_eq!(f.all("host"), ["a", "b"]);
        assert_eq!(f.one("namespace"), Some("x"));
        assert!(flags(&ISTIO, &["--namespace", "a", "--namespace", "b"]).is_err());
        assert!(flags(&ISTIO, &["--xds-listener", "x"]).is_err());
        assert!(flags(&ENVOY_GATEWAY, &["--mode", "sidecar"]).is_err());
        assert!(flags(&ENVOY_GATEWAY, &["--xds-listener", "x"]).is_ok());
    }

    #[test]
    fn wasm_sources() {
        let wasm = |url: &str| Wasm::from_flags(&flags(&ISTIO, &["--wasm-url", url]).unwrap());
        assert_eq!(
            wasm("oci://ghcr.io/x/y:1").unwrap().source,
            WasmSource::Oci("oci://ghcr.io/x/y:1".into())
        );
        assert_eq!(
            wasm("file:///opt/f.wasm").unwrap().source,
            WasmSource::File("/opt/f.wasm".into())
        );
        assert!(wasm("ghcr.io/x/y:1").is_err());
        assert!(Wasm::from_flags(&flags(&ISTIO, &[]).unwrap()).is_err());
        let bad_sha = flags(&ISTIO, &["--wasm-url", "oci://a/b", "--wasm-sha256", "AB"]).unwrap();
        assert!(Wasm::from_flags(&bad_sha).is_err());
    }

    #[test]
    fn the_header_names_the_command_quoted_for_a_shell() {
        let args: Vec<String> = ["istio", "app.yml", "--host", "a b", "--selector", "it's=x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            command_line(&args),
            r"jairouter-render istio app.yml --host 'a b' --selector 'it'\''s=x'"
        );
    }
}
