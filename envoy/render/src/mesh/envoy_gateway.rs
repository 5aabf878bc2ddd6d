//! Envoy Gateway: the filter as an EnvoyExtensionPolicy on our HTTPRoutes, one route rule per
//! instance matching the filter's choice, Backends for hosts outside the cluster,
//! BackendTLSPolicies for https, BackendTrafficPolicies for health checks and retries.
//!
//! allow_on_headers_stop_iteration: EG's Wasm API (`api/v1alpha1/wasm_types.go`: name, rootID,
//! code, config, failOpen, env) has no field for it and its translator
//! (`internal/xds/translator/wasm.go`) never sets it (envoyproxy/gateway issue 8382). Without it
//! the filter cannot pause in the headers to read the model from the body: such requests hang.
//! So an EnvoyPatchPolicy sets it on the wasm filter EG generates, which EG names
//! `envoy.filters.http.wasm/envoyextensionpolicy/<namespace>/<policy>/wasm/<index>`. It needs
//! EnvoyPatchPolicy enabled in the EnvoyGateway configuration and EG 1.6 or later (older ones
//! predate the field).

use super::{
    backends, gateway_api_duration, instances_with_service, metadata, place, Backend, Document,
    Names, Place, Wasm, WasmSource, RETRIABLE_STATUS, RETRY_ON, UNROUTED_BODY,
};
use crate::flags::{once, repeated, Args, Command};
use jairouter_filter::config::HealthCheckPolicy;
use jairouter_filter::contract::{MODEL_HEADER, ROUTING_HEADER};
use jairouter_filter::plan::{Instance, Plan, Service};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// `jairouter-render envoy-gateway`: what it takes (`--host` may repeat).
pub const COMMAND: Command = Command {
    name: "envoy-gateway",
    operands: &["FILE"],
    flags: &[
        once("api-keys"),
        once("wasm-url"),
        once("wasm-sha256"),
        once("namespace"),
        once("gateway"),
        repeated("host"),
        once("xds-listener"),
    ],
    usage: "FILE [--api-keys KEYS] --wasm-url URL [--wasm-sha256 HEX] [--namespace NS] \
--gateway [NS/]NAME [--host H ...] [--xds-listener NAME]",
};

const NAME: &str = "jairouter";
const EG_GROUP: &str = "gateway.envoyproxy.io";
const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// Gateway API allows at most 16 rules in an HTTPRoute.
const MAX_RULES: usize = 16;
/// What a health check accepts. Our checker counts any answer below 500 as up (a 401 or 404
/// still shows the server is there); EG takes a list, not a range, and its checks cannot send
/// the instance's credentials: so the answers a live OpenAI-compatible server gives to
/// `GET /v1/models`, with or without credentials.
const HEALTHY_STATUSES: [u16; 7] = [200, 204, 400, 401, 403, 404, 429];

pub struct Options {
    /// Where the HTTPRoutes and policies go.
    pub namespace: String,
    pub gateway_name: String,
    pub gateway_namespace: String,
    /// HTTPRoute hostnames (none: every hostname of the Gateway's listeners).
    pub hosts: Vec<String>,
    /// The name of the xDS listener EG generates for the Gateway's HTTP listener, which the
    /// patch names.
    pub xds_listener: String,
    pub wasm: Wasm,
}

impl Options {
    pub fn from_flags(flags: &Args) -> Result<Options, String> {
        let namespace = flags.one("namespace").unwrap_or("default").to_string();
        let gateway = flags
            .one("gateway")
            .ok_or("envoy-gateway needs --gateway [NS/]NAME, the Gateway the routes attach to")?;
        let (gateway_namespace, gateway_name) = match gateway.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => (namespace.clone(), gateway.to_string()),
        };
        let wasm = Wasm::from_flags(flags)?;
        if let WasmSource::File(_) = wasm.source {
            return Err(
                "--wasm-url: Envoy Gateway fetches the module itself: oci:// or https://".into(),
            );
        }
        let mut hosts = Vec::new();
        for host in flags.all("host") {
            if host.is_empty() || host.contains([' ', '/', ':']) {
                return Err(format!("--host {host}: a host name"));
            }
            // "*" is every hostname, which an HTTPRoute says by naming none.
            if host != "*" {
                hosts.push(host.to_string());
            }
        }
        // EG names the listener <namespace>/<gateway>/<listener name> (before its xDS name
        // scheme v2, the default from EG 1.10, which names it <protocol>-<port>).
        let xds_listener = flags
            .one("xds-listener")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{gateway_namespace}/{gateway_name}/http"));
        Ok(Options {
            namespace,
            gateway_name,
            gateway_namespace,
            hosts,
            xds_listener,
            wasm,
        })
    }
}

/// How an instance is reached: a Service in the cluster or an EG Backend outside it.
enum Target {
    Service {
        name: String,
        namespace: String,
        port: u16,
    },
    Backend {
        name: String,
    },
}

/// The EG Backend's name of each host and port outside the cluster.
type OutsideBackends = BTreeMap<(String, u16), String>;

/// The HTTPRoute rule of one instance, and the spec of its BackendTrafficPolicy (health checks,
/// outlier detection) when it needs one.
struct InstanceRule {
    name: String,
    rule: Value,
    traffic_policy: Option<Value>,
}

pub fn render(
    router: &Plan,
    filter_config: &Value,
    opts: &Options,
) -> Result<Vec<Document>, String> {
    let backends = backends(router, &opts.namespace)?;
    // Names are given in this order (outside backends, rules, TLS policies): a clash is settled
    // the same way every time.
    let mut names = Names::default();
    let outside = outside_backends(&backends, &mut names);
    let rules = instance_rules(router, &outside, &mut names, opts);
    let route_names = route_names(rules.len());
    let mut documents = vec![
        extension_policy(filter_config, &route_names, opts),
        stop_iteration_patch(opts),
        unrouted_filter(opts),
    ];
    documents.extend(http_routes(&rules, &route_names, opts));
    documents.extend(outside_backend_resources(&backends, &outside, opts));
    documents.extend(reference_grants(&backends, opts));
    documents.extend(service_tls_policies(&backends, &mut names));
    documents.extend(traffic_policies(rules, &route_names, opts));
    Ok(documents)
}

/// One EG Backend per outside host and port.
fn outside_backends(backends: &[Backend], names: &mut Names) -> OutsideBackends {
    let mut outside = OutsideBackends::new();
    for backend in backends {
        if let Place::External { .. } = backend.place {
            for port in backend.ports.keys() {
                let name = names.name(
                    &format!("{NAME}-{}-{port}", backend.host),
                    &format!("Backend/{}:{port}", backend.host),
                );
                outside.insert((backend.host.clone(), *port), name);
            }
        }
    }
    outside
}

/// How `instance` is reached from the route.
fn target(instance: &Instance, outside: &OutsideBackends, namespace: &str) -> Target {
    let url = &instance.spec.base_url;
    match place(&url.host, namespace) {
        Place::InCluster {
            service, namespace, ..
        } => Target::Service {
            name: service,
            namespace,
            port: url.port,
        },
        Place::External { .. } => Target::Backend {
            name: outside
                .get(&(url.host.clone(), url.port))
                .cloned()
                .unwrap_or_default(),
        },
    }
}

fn instance_rules(
    router: &Plan,
    outside: &OutsideBackends,
    names: &mut Names,
    opts: &Options,
) -> Vec<InstanceRule> {
    instances_with_service(router)
        .into_iter()
        .map(|(service, instance)| {
            let name = names.name(
                &instance.spec.cluster,
                &format!("rule/{}", instance.spec.cluster),
            );
            let target = target(instance, outside, &opts.namespace);
            InstanceRule {
                rule: instance_rule(&name, instance, &target, &opts.namespace, router),
                traffic_policy: traffic_policy_spec(service, instance),
                name,
            }
        })
        .collect()
}

/// The HTTPRoutes' names: `rule_count` instance rules and the answer for what the filter did not
/// route, 16 rules to a route.
fn route_names(rule_count: usize) -> Vec<String> {
    let route_count = (rule_count + 1).div_ceil(MAX_RULES);
    (0..route_count)
        .map(|i| {
            if i == 0 {
                NAME.to_string()
            } else {
                format!("{NAME}-{}", i + 1)
            }
        })
        .collect()
}

/// The HTTPRoute holding the `index`th instance rule (the first route starts with the default
/// rule).
fn route_of_rule(route_names: &[String], index: usize) -> &str {
    route_names
        .get((index + 1) / MAX_RULES)
        .map_or(NAME, String::as_str)
}

fn http_routes(rules: &[InstanceRule], route_names: &[String], opts: &Options) -> Vec<Document> {
    let all: Vec<Value> = std::iter::once(unrouted_rule())
        .chain(rules.iter().map(|r| r.rule.clone()))
        .collect();
    route_names
        .iter()
        .zip(all.chunks(MAX_RULES))
        .map(|(name, chunk)| http_route(name, chunk.to_vec(), opts))
        .collect()
}

/// The Backends outside the cluster, with the TLS policy of those spoken to over https.
fn outside_backend_resources(
    backends: &[Backend],
    outside: &OutsideBackends,
    opts: &Options,
) -> Vec<Document> {
    let mut documents = Vec::new();
    for backend in backends {
        if let Place::External { ip, .. } = backend.place {
            for (port, tls) in &backend.ports {
                let name = &outside[&(backend.host.clone(), *port)];
                documents.push(backend_resource(name, &backend.host, *port, ip, opts));
                if *tls {
                    let target = json!({"group": EG_GROUP, "kind": "Backend", "name": name});
                    documents.push(tls_policy(name, target, &opts.namespace, &backend.host));
                }
            }
        }
    }
    documents
}

/// The TLS policy of each Service in the cluster spoken to over https.
fn service_tls_policies(backends: &[Backend], names: &mut Names) -> Vec<Document> {
    let mut documents = Vec::new();
    for backend in backends {
        if let Place::InCluster {
            service, namespace, ..
        } = &backend.place
        {
            if backend.ports.values().any(|tls| *tls) {
                let name = names.name(
                    &format!("{NAME}-{service}"),
                    &format!("BackendTLSPolicy/{namespace}/{service}"),
                );
                let target = json!({"group": "", "kind": "Service", "name": service});
                documents.push(tls_policy(&name, target, namespace, &backend.host));
            }
        }
    }
    documents
}

/// A BackendTrafficPolicy for each rule that needs one, attached to the rule in its route.
fn traffic_policies(
    rules: Vec<InstanceRule>,
    route_names: &[String],
    opts: &Options,
) -> Vec<Document> {
    let mut documents = Vec::new();
    for (index, rule) in rules.into_iter().enumerate() {
        let Some(mut spec) = rule.traffic_policy else {
            continue;
        };
        spec["targetRefs"] = json!([{
            "group": GATEWAY_API_GROUP,
            "kind": "HTTPRoute",
            "name": route_of_rule(route_names, index),
            "sectionName": rule.name
        }]);
        documents.push(Document::new(json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "BackendTrafficPolicy",
            "metadata": metadata(&rule.name, &opts.namespace),
            "spec": spec
        })));
    }
    documents
}

/// The name EG gives the wasm filter of the `index`th entry of an EnvoyExtensionPolicy.
pub fn wasm_filter_name(namespace: &str, policy: &str, index: usize) -> String {
    format!("envoy.filters.http.wasm/envoyextensionpolicy/{namespace}/{policy}/wasm/{index}")
}

const EXTENSION_POLICY_COMMENT: &str = "\
The JAiRouter filter on our HTTPRoutes (EG inserts it before the router and enables it on their
rules only). Editing config is a live reload (EG pushes it to its proxies): render it, or check it
with `jairouter-render check`, rather than editing it here. allow_on_headers_stop_iteration, which
reading the body for the model needs, is set by the EnvoyPatchPolicy below.";

fn extension_policy(filter_config: &Value, routes: &[String], opts: &Options) -> Document {
    let code = match &opts.wasm.source {
        WasmSource::Oci(url) => {
            let mut image = json!({"url": url.trim_start_matches("oci://")});
            if let Some(sha) = &opts.wasm.sha256 {
                image["sha256"] = json!(sha);
            }
            json!({"type": "Image", "image": image})
        }
        // (A file:// module is refused by Options: EG's controller fetches the module.)
        WasmSource::Http(url) | WasmSource::File(url) => {
            let mut http = json!({"url": url});
            if let Some(sha) = &opts.wasm.sha256 {
                http["sha256"] = json!(sha);
            }
            json!({"type": "HTTP", "http": http})
        }
    };
    let targets: Vec<Value> = routes
        .iter()
        .map(|r| json!({"group": GATEWAY_API_GROUP, "kind": "HTTPRoute", "name": r}))
        .collect();
    Document::with_comment(
        EXTENSION_POLICY_COMMENT,
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyExtensionPolicy",
            "metadata": metadata(NAME, &opts.namespace),
            "spec": {
                "targetRefs": targets,
                "wasm": [{
                    "name": NAME,
                    "rootID": NAME,
                    "code": code,
                    "config": filter_config,
                    "failOpen": false
                }]
            }
        }),
    )
}

const PATCH_COMMENT: &str = "\
Sets allow_on_headers_stop_iteration on the wasm filter EG generates from the policy above (EG's
API has no field for it; without it requests whose model is in the body hang). Needs
extensionApis.enableEnvoyPatchPolicy: true in the EnvoyGateway configuration. The listener name
follows EG's xDS naming: <namespace>/<gateway>/<listener>, or <protocol>-<port> with the
XDSNameSchemeV2 runtime flag (the default from EG 1.10): render with --xds-listener then.";

fn stop_iteration_patch(opts: &Options) -> Document {
    let filter = wasm_filter_name(&opts.namespace, NAME, 0);
    Document::with_comment(
        PATCH_COMMENT,
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyPatchPolicy",
            "metadata": metadata(&format!("{NAME}-stop-iteration"), &opts.gateway_namespace),
            "spec": {
                "targetRef": {"group": GATEWAY_API_GROUP, "kind": "Gateway", "name": opts.gateway_name},
                "type": "JSONPatch",
                "jsonPatches": [{
                    "type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                    "name": opts.xds_listener,
                    "operation": {
                        "op": "add",
                        "jsonPath": format!("$..http_filters[?(@.name == '{filter}')].typed_config.config"),
                        "path": "allow_on_headers_stop_iteration",
                        "value": true
                    }
                }]
            }
        }),
    )
}

fn unrouted_filter(opts: &Options) -> Document {
    Document::with_comment(
        "The answer to requests the filter did not route (it always names an instance or answers itself).",
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "HTTPRouteFilter",
            "metadata": metadata(&format!("{NAME}-unrouted"), &opts.namespace),
            "spec": {"directResponse": {
                "contentType": "application/json",
                "statusCode": 503,
                "body": {"type": "Inline", "inline": UNROUTED_BODY}
            }}
        }),
    )
}

/// Matches every request (the default match): the header-matching rules win over it (more
/// header matches take precedence), so it gets only what the filter did not route.
fn unrouted_rule() -> Value {
    json!({
        "name": "unrouted",
        "filters": [{
            "type": "ExtensionRef",
            "extensionRef": {"group": EG_GROUP, "kind": "HTTPRouteFilter", "name": format!("{NAME}-unrouted")}
        }]
    })
}

fn instance_rule(
    name: &str,
    instance: &Instance,
    target: &Target,
    route_namespace: &str,
    router: &Plan,
) -> Value {
    let url = &instance.spec.base_url;
    let backend_ref = match target {
        Target::Service {
            name,
            namespace,
            port,
        } if *namespace == route_namespace => json!({"name": name, "port": port}),
        Target::Service {
            name,
            namespace,
            port,
        } => json!({"name": name, "namespace": namespace, "port": port}),
        Target::Backend { name } => json!({"group": EG_GROUP, "kind": "Backend", "name": name}),
    };
    let mut filters = vec![json!({
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"remove": [ROUTING_HEADER, MODEL_HEADER]}
    })];
    // The backend's own name as Host (the filter already set :path, base-url prefix included).
    // A Gateway API hostname cannot hold an IPv6 address or an underscore: those keep the client's.
    if !url.host.contains([':', '_']) {
        filters.push(json!({"type": "URLRewrite", "urlRewrite": {"hostname": url.host}}));
    }
    json!({
        "name": name,
        "matches": [{"headers": [{"type": "Exact", "name": ROUTING_HEADER, "value": instance.spec.cluster}]}],
        "filters": filters,
        "backendRefs": [backend_ref],
        // 0s: no timeout (EG's default would cut generations that stream for minutes).
        "timeouts": {"request": gateway_api_duration(router.spec.request_timeout_ms)}
    })
}

fn http_route(name: &str, rules: Vec<Value>, opts: &Options) -> Document {
    let mut parent =
        json!({"group": GATEWAY_API_GROUP, "kind": "Gateway", "name": opts.gateway_name});
    if opts.gateway_namespace != opts.namespace {
        parent["namespace"] = json!(opts.gateway_namespace);
    }
    let mut spec = json!({"parentRefs": [parent], "rules": rules});
    if !opts.hosts.is_empty() {
        spec["hostnames"] = json!(opts.hosts);
    }
    Document::with_comment(
        "One rule per instance: the filter names the instance in x-jairouter-cluster (after removing any\n\
         client-supplied one) and the rule sends the request there; our headers never reach a backend.",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": metadata(name, &opts.namespace),
            "spec": spec
        }),
    )
}

fn backend_resource(name: &str, host: &str, port: u16, ip: bool, opts: &Options) -> Document {
    let endpoint = if ip {
        json!({"ip": {"address": host, "port": port}})
    } else {
        json!({"fqdn": {"hostname": host, "port": port}})
    };
    Document::new(json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "Backend",
        "metadata": metadata(name, &opts.namespace),
        "spec": {"endpoints": [endpoint]}
    }))
}

/// TLS to an https backend (`target`: its Service or Backend, in `namespace`), its certificate
/// checked against the system's CAs and its name.
fn tls_policy(name: &str, target: Value, namespace: &str, host: &str) -> Document {
    Document::new(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "BackendTLSPolicy",
        "metadata": metadata(name, namespace),
        "spec": {
            "targetRefs": [target],
            "validation": {"hostname": host, "wellKnownCACertificates": "System"}
        }
    }))
}

/// Lets our HTTPRoutes use Services of other namespaces.
fn reference_grants(backends: &[Backend], opts: &Options) -> Vec<Document> {
    let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for backend in backends {
        if let Place::InCluster {
            service, namespace, ..
        } = &backend.place
        {
            if *namespace != opts.namespace {
                by_namespace.entry(namespace).or_default().push(service);
            }
        }
    }
    by_namespace
        .into_iter()
        .map(|(namespace, services)| {
            let to: Vec<Value> = services
                .iter()
                .map(|s| json!({"group": "", "kind": "Service", "name": s}))
                .collect();
            Document::new(json!({
                "apiVersion": "gateway.networking.k8s.io/v1beta1",
                "kind": "ReferenceGrant",
                "metadata": metadata(&format!("{NAME}-{}", opts.namespace), namespace),
                "spec": {
                    "from": [{"group": GATEWAY_API_GROUP, "kind": "HTTPRoute", "namespace": opts.namespace}],
                    "to": to
                }
            }))
        })
        .collect()
}

/// Health checks and retries of one instance's rule (its own EG cluster). The active check is
/// the instance's `health-check` (in a mesh, EG's checks replace the standalone gateway's
/// checker); the passive one ejects after the breaker's threshold of consecutive 5xx. Retries
/// go to another endpoint of the same instance (its Service's other pods); moving a request to
/// another instance of the model is left to the filter's breakers.
fn traffic_policy_spec(service: &Service, instance: &Instance) -> Option<Value> {
    let mut spec = json!({});
    let mut health = json!({});
    if let Some(check) = &instance.spec.health_check {
        health["active"] = active_check(check, instance);
    }
    if let Some(breaker) = instance.spec.circuit_breaker.as_ref().filter(|b| b.enabled) {
        health["passive"] = json!({
            "consecutive5XxErrors": breaker.failure_threshold,
            "interval": "10s",
            "baseEjectionTime": gateway_api_duration(breaker.timeout_ms),
            "maxEjectionPercent": 100
        });
    }
    if health.as_object().is_some_and(|h| !h.is_empty()) {
        spec["healthCheck"] = health;
    }
    if service.spec.retries > 0 {
        let mut triggers: Vec<&str> = RETRY_ON.to_vec();
        triggers.push("retriable-status-codes");
        spec["retry"] = json!({
            "numRetries": service.spec.retries,
            "retryOn": {"triggers": triggers, "httpStatusCodes": [RETRIABLE_STATUS]},
            "perRetry": {"backOff": {"baseInterval": "5ms", "maxInterval": "50ms"}}
        });
    }
    spec.as_object()
        .is_some_and(|s| !s.is_empty())
        .then_some(spec)
}

fn active_check(check: &HealthCheckPolicy, instance: &Instance) -> Value {
    let url = &instance.spec.base_url;
    let mut http = json!({
        "path": format!("{}{}", url.prefix, check.path),
        "expectedStatuses": HEALTHY_STATUSES
    });
    if url.host.parse::<std::net::IpAddr>().is_err() {
        // Envoy would otherwise send the cluster's name as Host.
        http["hostname"] = json!(url.host);
    }
    json!({
        "type": "HTTP",
        "interval": gateway_api_duration(check.interval_ms),
        "timeout": gateway_api_duration(check.timeout_ms),
        "unhealthyThreshold": check.unhealthy_threshold,
        "healthyThreshold": check.healthy_threshold,
        "http": http
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, flags, of_kind, parse};
    use super::*;

    const CONFIG: &str = r#"
model:
  health-check: {interval: 10000, timeout: 2000, path: /health}
  circuit-breaker: {failure-threshold: 3, timeout: 45000}
  retries: 0
  request-timeout: 90000
  services:
    chat:
      retries: 2
      instances:
        - {name: llama, base-url: "http://ollama:11434", instance-id: ollama-0}
        - {name: llama, base-url: "http://vllm.models.svc.cluster.local:8000/serving", instance-id: vllm}
        - {name: gpt, base-url: "https://api.example.com/v1x", instance-id: hosted}
        - {name: gpt, base-url: "http://10.1.2.3:9000", instance-id: by-ip, health-check: {enabled: false}}
    embedding:
      instances:
        - {name: embed, base-url: "http://ollama:11434", instance-id: ollama-embed}
"#;

    fn render_with(yaml: &str, args: &[&str]) -> (Value, Vec<Value>) {
        let (filter_config, router) = config(yaml);
        let mut all = vec!["--namespace", "llm"];
        if !args.contains(&"--wasm-url") {
            all.extend(["--wasm-url", "oci://registry.example/jairouter:1"]);
        }
        all.extend_from_slice(args);
        let opts = Options::from_flags(&flags(&COMMAND, &all).unwrap()).unwrap();
        let documents = render(&router, &filter_config, &opts).unwrap();
        (filter_config, parse(&documents))
    }

    fn rules(docs: &[Value]) -> Vec<Value> {
        of_kind(docs, "HTTPRoute")
            .iter()
            .flat_map(|r| r["spec"]["rules"].as_array().unwrap().clone())
            .collect()
    }

    fn rule(docs: &[Value], name: &str) -> Value {
        rules(docs).into_iter().find(|r| r["name"] == name).unwrap()
    }

    #[test]
    fn one_rule_per_instance_to_a_service_or_a_backend() {
        let (_, docs) = render_with(CONFIG, &["--gateway", "eg", "--host", "llm.example.com"]);
        let ollama = rule(&docs, "jairouter-ollama-0");
        assert_eq!(
            ollama["matches"],
            json!([{"headers": [{"type": "Exact", "name": ROUTING_HEADER, "value": "jairouter-ollama-0"}]}])
        );
        assert_eq!(
            ollama["backendRefs"],
            json!([{"name": "ollama", "port": 11434}])
        );
        assert_eq!(
            ollama["filters"][0]["requestHeaderModifier"]["remove"],
            json!([ROUTING_HEADER, MODEL_HEADER])
        );
        assert_eq!(ollama["filters"][1]["urlRewrite"]["hostname"], "ollama");
        assert_eq!(ollama["timeouts"]["request"], "1m30s");
        let vllm = rule(&docs, "jairouter-vllm");
        assert_eq!(
            vllm["backendRefs"],
            json!([{"name": "vllm", "namespace": "models", "port": 8000}])
        );
        let hosted = rule(&docs, "jairouter-hosted");
        let backend_name = hosted["backendRefs"][0]["name"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(hosted["backendRefs"][0]["kind"], "Backend");
        let backend = of_kind(&docs, "Backend")
            .into_iter()
            .find(|b| b["metadata"]["name"] == backend_name.as_str())
            .unwrap();
        assert_eq!(
            backend["spec"]["endpoints"],
            json!([{"fqdn": {"hostname": "api.example.com", "port": 443}}])
        );
        let by_ip = rule(&docs, "jairouter-by-ip");
        let ip_backend = of_kind(&docs, "Backend")
            .into_iter()
            .find(|b| b["metadata"]["name"] == by_ip["backendRefs"][0]["name"])
            .unwrap();
        assert_eq!(
            ip_backend["spec"]["endpoints"],
            json!([{"ip": {"address": "10.1.2.3", "port": 9000}}])
        );

        let route = of_kind(&docs, "HTTPRoute")[0];
        assert_eq!(route["spec"]["hostnames"], json!(["llm.example.com"]));
        assert_eq!(
            route["spec"]["parentRefs"],
            json!([{"group": GATEWAY_API_GROUP, "kind": "Gateway", "name": "eg"}])
        );
        let unrouted = &route["spec"]["rules"][0];
        assert!(unrouted.get("matches").is_none() && unrouted.get("backendRefs").is_none());
        let filter = of_kind(&docs, "HTTPRouteFilter")[0];
        assert_eq!(
            unrouted["filters"][0]["extensionRef"]["name"],
            filter["metadata"]["name"]
        );
        assert_eq!(filter["spec"]["directResponse"]["statusCode"], 503);
        let body: Value = serde_json::from_str(
            filter["spec"]["directResponse"]["body"]["inline"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["error"]["type"], "server_error");
    }

    #[test]
    fn tls_policies_grants_and_traffic_policies() {
        let (_, docs) = render_with(CONFIG, &["--gateway", "gateways/eg"]);
        let tls = of_kind(&docs, "BackendTLSPolicy");
        assert_eq!(tls.len(), 1);
        assert_eq!(tls[0]["spec"]["targetRefs"][0]["kind"], "Backend");
        assert_eq!(
            tls[0]["spec"]["validation"],
            json!({"hostname": "api.example.com", "wellKnownCACertificates": "System"})
        );
        let grants = of_kind(&docs, "ReferenceGrant");
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0]["metadata"]["namespace"], "models");
        assert_eq!(
            grants[0]["spec"]["to"],
            json!([{"group": "", "kind": "Service", "name": "vllm"}])
        );
        assert_eq!(grants[0]["spec"]["from"][0]["namespace"], "llm");

        let policies = of_kind(&docs, "BackendTrafficPolicy");
        let policy = |rule: &str| {
            policies
                .iter()
                .find(|p| p["spec"]["targetRefs"][0]["sectionName"] == rule)
                .unwrap()
        };
        let hosted = &policy("jairouter-hosted")["spec"];
        assert_eq!(hosted["targetRefs"][0]["name"], "jairouter");
        let active = &hosted["healthCheck"]["active"];
        assert_eq!(active["http"]["path"], "/v1x/health");
        assert_eq!(active["http"]["hostname"], "api.example.com");
        assert_eq!(active["interval"], "10s");
        assert_eq!(active["timeout"], "2s");
        assert_eq!(hosted["healthCheck"]["passive"]["consecutive5XxErrors"], 3);
        assert_eq!(hosted["healthCheck"]["passive"]["baseEjectionTime"], "45s");
        assert_eq!(hosted["retry"]["numRetries"], 2);
        assert_eq!(hosted["retry"]["retryOn"]["httpStatusCodes"], json!([429]));
        let by_ip = &policy("jairouter-by-ip")["spec"];
        assert!(by_ip["healthCheck"].get("active").is_none());
        let embed = &policy("jairouter-ollama-embed")["spec"];
        assert!(embed.get("retry").is_none());

        let patch = of_kind(&docs, "EnvoyPatchPolicy")[0];
        assert_eq!(patch["metadata"]["namespace"], "gateways");
        assert_eq!(patch["spec"]["jsonPatches"][0]["name"], "gateways/eg/http");
        let route = of_kind(&docs, "HTTPRoute")[0];
        assert_eq!(route["spec"]["parentRefs"][0]["namespace"], "gateways");
    }

    #[test]
    fn an_https_service_in_the_cluster_gets_its_tls_policy_in_its_namespace() {
        let yaml = "services:\n  chat:\n    instances:\n      - {name: m, base-url: \"https://vllm.models.svc:8443\"}\n";
        let (_, docs) = render_with(yaml, &["--gateway", "eg"]);
        let tls = of_kind(&docs, "BackendTLSPolicy");
        assert_eq!(tls.len(), 1);
        assert_eq!(tls[0]["metadata"]["namespace"], "models");
        assert_eq!(
            tls[0]["spec"]["targetRefs"],
            json!([{"group": "", "kind": "Service", "name": "vllm"}])
        );
        assert_eq!(tls[0]["spec"]["validation"]["hostname"], "vllm.models.svc");
        assert!(of_kind(&docs, "Backend").is_empty());
    }

    #[test]
    fn the_extension_policy_carries_the_filter_configuration() {
        let (filter_config, docs) = render_with(
            CONFIG,
            &["--gateway", "eg", "--wasm-sha256", &"b".repeat(64)],
        );
        let policy = of_kind(&docs, "EnvoyExtensionPolicy")[0];
        let wasm = &policy["spec"]["wasm"][0];
        assert_eq!(wasm["config"], filter_config);
        Plan::from_value(&wasm["config"]).unwrap();
        assert_eq!(wasm["failOpen"], false);
        assert_eq!(
            wasm["code"],
            json!({"type": "Image", "image": {"url": "registry.example/jairouter:1", "sha256": "b".repeat(64)}})
        );
        assert_eq!(
            policy["spec"]["targetRefs"],
            json!([{"group": GATEWAY_API_GROUP, "kind": "HTTPRoute", "name": "jairouter"}])
        );
        let patch = &of_kind(&docs, "EnvoyPatchPolicy")[0]["spec"]["jsonPatches"][0]["operation"];
        assert_eq!(
            patch["jsonPath"],
            "$..http_filters[?(@.name == 'envoy.filters.http.wasm/envoyextensionpolicy/llm/jairouter/wasm/0')].typed_config.config"
        );
        assert_eq!(patch["value"], true);

        let (_, docs) = render_with(
            CONFIG,
            &[
                "--gateway",
                "eg",
                "--wasm-url",
                "https://files.example/f.wasm",
            ],
        );
        let wasm = &of_kind(&docs, "EnvoyExtensionPolicy")[0]["spec"]["wasm"][0];
        assert_eq!(
            wasm["code"],
            json!({"type": "HTTP", "http": {"url": "https://files.example/f.wasm"}})
        );
    }

    #[test]
    fn many_instances_spread_over_routes_of_sixteen_rules() {
        let mut yaml = String::from("services:\n  chat:\n    instances:\n");
        for i in 0..40 {
            yaml.push_str(&format!(
                "      - {{name: m{i}, base-url: \"http://backend-{i}:8000\"}}\n"
            ));
        }
        let (_, docs) = render_with(&yaml, &["--gateway", "eg"]);
        let routes = of_kind(&docs, "HTTPRoute");
        let sizes: Vec<usize> = routes
            .iter()
            .map(|r| r["spec"]["rules"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [16, 16, 9]);
        let targets = &of_kind(&docs, "EnvoyExtensionPolicy")[0]["spec"]["targetRefs"];
        assert_eq!(targets.as_array().unwrap().len(), 3);
        assert_eq!(rules(&docs).len(), 41);
        for policy in of_kind(&docs, "BackendTrafficPolicy") {
            let target = &policy["spec"]["targetRefs"][0];
            let route = routes
                .iter()
                .find(|r| r["metadata"]["name"] == target["name"])
                .unwrap();
            assert!(route["spec"]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == target["sectionName"]));
        }
    }

    #[test]
    fn options_are_checked() {
        let opts = |args: &[&str]| flags(&COMMAND, args).and_then(|f| Options::from_flags(&f));
        assert!(opts(&["--wasm-url", "oci://r/i"])
            .err()
            .unwrap()
            .contains("--gateway"));
        assert!(opts(&["--wasm-url", "file:///x.wasm", "--gateway", "g"]).is_err());
        assert!(opts(&[
            "--wasm-url",
            "oci://r/i",
            "--gateway",
            "g",
            "--mode",
            "sidecar"
        ])
        .is_err());
        let o = opts(&[
            "--wasm-url",
            "oci://r/i",
            "--gateway",
            "g",
            "--host",
            "*",
            "--xds-listener",
            "tcp-80",
        ])
        .unwrap();
        assert!(o.hosts.is_empty());
        assert_eq!(o.xds_listener, "tcp-80");
    }
}
