//! Istio: the filter in the ingress gateway (`--mode gateway`) or in the client workloads'
//! sidecars (`--mode sidecar`, outbound), and the VirtualService, ServiceEntries and
//! DestinationRules that take each request where the filter decided.
//!
//! Why an EnvoyFilter by default rather than a WasmPlugin: reading the body for the model means
//! pausing in the request headers, which hangs unless the wasm filter's PluginConfig has
//! `allow_on_headers_stop_iteration: true` (Envoy's default is false; envoy-notes). Istio's
//! WasmPlugin has no field for it (istio/api `extensions/v1alpha1/wasm.proto`: url, sha256,
//! imagePullPolicy, imagePullSecret, pluginConfig, pluginName, phase, priority, failStrategy,
//! vmConfig (env only), match, type, selector/targetRefs), istiod never sets it when it turns a
//! WasmPlugin into Envoy config (istio/istio `pilot/pkg/model/extensions.go`), and an
//! EnvoyFilter cannot amend the extension config a WasmPlugin produces (EXTENSION_CONFIG
//! patches are only honoured with ADD). So the EnvoyFilter variant adds the wasm filter itself,
//! through the same ECDS path a WasmPlugin takes (the istio-agent downloads an `oci://` or
//! `https://` module and hands Envoy a local file), with the flag set. It needs Istio 1.28 or
//! later: older control planes and proxies predate the field (Envoy 1.35).

use super::{
    backends, instances_with_service, metadata, place, Backend, Document, Names, Place, Wasm,
    WasmSource, RETRIABLE_STATUS, RETRY_ON, UNROUTED_BODY,
};
use crate::envoy_json::{duration, plugin_config, WASM_FILTER_TYPE};
use crate::flags::{once, repeated, Args, Command};
use jairouter_filter::config::CircuitBreakerPolicy;
use jairouter_filter::contract::{MODEL_HEADER, ROUTING_HEADER};
use jairouter_filter::plan::Plan;
use serde_json::{json, Value};

/// `jairouter-render istio`: what it takes (`--selector` and `--host` may repeat).
pub const COMMAND: Command = Command {
    name: "istio",
    operands: &["FILE"],
    flags: &[
        once("api-keys"),
        once("wasm-url"),
        once("wasm-sha256"),
        once("namespace"),
        once("mode"),
        once("gateway"),
        repeated("selector"),
        repeated("host"),
        once("proxy-namespace"),
        once("install"),
    ],
    usage: "FILE [--api-keys KEYS] --wasm-url URL [--wasm-sha256 HEX] [--namespace NS] \
[--mode gateway|sidecar] [--gateway NS/NAME] [--selector KEY=VALUE ...] [--host H ...] \
[--proxy-namespace NS] [--install envoyfilter|wasmplugin]",
};

/// The name of every object we render, and of the wasm filter (its ECDS resource and the key of
/// the per-virtual-host switch that turns it on).
const NAME: &str = "jairouter";
/// The port of the Service clients call in sidecar mode.
const SIDECAR_PORT: u16 = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In the ingress gateway: requests from outside the mesh.
    Gateway,
    /// In the sidecars of the client workloads: their outbound requests to the `--host`s.
    Sidecar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    EnvoyFilter,
    WasmPlugin,
}

pub struct Options {
    /// Where the routing resources (VirtualService, ServiceEntries, DestinationRules) go.
    pub namespace: String,
    pub mode: Mode,
    /// The proxies that get the filter (`istio: ingressgateway` by default in gateway mode;
    /// empty: every workload of `proxy_namespace`).
    pub selector: Vec<(String, String)>,
    /// The hosts clients call.
    pub hosts: Vec<String>,
    /// Gateway mode: the Istio Gateway (`NS/NAME`) the VirtualService binds to.
    pub gateway: Option<String>,
    /// Where the EnvoyFilter or WasmPlugin goes: a workload selector only selects pods of its
    /// own namespace (the ingress gateway's, `istio-system` by default).
    pub proxy_namespace: String,
    pub install: Install,
    pub wasm: Wasm,
}

impl Options {
    pub fn from_flags(flags: &Args) -> Result<Options, String> {
        let namespace = flags.one("namespace").unwrap_or("default").to_string();
        let mode = match flags.one("mode").unwrap_or("gateway") {
            "gateway" => Mode::Gateway,
            "sidecar" => Mode::Sidecar,
            other => return Err(format!("--mode {other}: gateway or sidecar")),
        };
        let install = match flags.one("install").unwrap_or("envoyfilter") {
            "envoyfilter" => Install::EnvoyFilter,
            "wasmplugin" => Install::WasmPlugin,
            other => return Err(format!("--install {other}: envoyfilter or wasmplugin")),
        };
        let selector = selector(mode, &flags.all("selector"))?;
        let gateway = bound_gateway(mode, flags.one("gateway"), &namespace)?;
        let hosts = hosts(mode, &flags.all("host"), &namespace)?;
        let proxy_namespace = match (flags.one("proxy-namespace"), mode) {
            (Some(ns), _) => ns.to_string(),
            (None, Mode::Gateway) => "istio-system".to_string(),
            (None, Mode::Sidecar) => namespace.clone(),
        };
        Ok(Options {
            namespace,
            mode,
            selector,
            hosts,
            gateway,
            proxy_namespace,
            install,
            wasm: Wasm::from_flags(flags)?,
        })
    }

    fn context(&self) -> &'static str {
        match self.mode {
            Mode::Gateway => "GATEWAY",
            Mode::Sidecar => "SIDECAR_OUTBOUND",
        }
    }
}

/// `--gateway`: the Istio Gateway (`NS/NAME`) the VirtualService binds to, in gateway mode only.
fn bound_gateway(
    mode: Mode,
    gateway: Option<&str>,
    namespace: &str,
) -> Result<Option<String>, String> {
    match (mode, gateway) {
        (Mode::Gateway, None) => Err(
            "--mode gateway needs --gateway NS/NAME, the Istio Gateway the VirtualService binds to"
                .into(),
        ),
        (Mode::Gateway, Some(g)) if g.contains('/') => Ok(Some(g.to_string())),
        (Mode::Gateway, Some(g)) => Ok(Some(format!("{namespace}/{g}"))),
        (Mode::Sidecar, Some(_)) => {
            Err("--gateway is for --mode gateway; sidecar mode serves the mesh".into())
        }
        (Mode::Sidecar, None) => Ok(None),
    }
}

/// `--selector KEY=VALUE ...`: the proxies that get the filter (in gateway mode, the ingress
/// gateway's unless told).
fn selector(mode: Mode, pairs: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut selector = Vec::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("--selector {pair}: KEY=VALUE"))?;
        selector.push((key.to_string(), value.to_string()));
    }
    if mode == Mode::Gateway && selector.is_empty() {
        selector.push(("istio".into(), "ingressgateway".into()));
    }
    Ok(selector)
}

/// `--host H ...`: the hosts clients call (every host through the gateway, or the sidecar
/// mode's `llm` Service, unless told).
fn hosts(mode: Mode, given: &[&str], namespace: &str) -> Result<Vec<String>, String> {
    let mut hosts: Vec<String> = given.iter().map(|h| h.to_string()).collect();
    for host in &hosts {
        if host.is_empty() || host.contains([' ', '/', ':']) {
            return Err(format!("--host {host}: a host name"));
        }
    }
    match mode {
        Mode::Gateway => {
            if hosts.is_empty() {
                hosts.push("*".into());
            }
        }
        Mode::Sidecar => {
            if hosts.is_empty() {
                hosts.push(format!("llm.{namespace}.svc.cluster.local"));
            }
            // The VirtualService names in-cluster hosts in full, as the sidecar's virtual
            // hosts list them.
            for host in &mut hosts {
                match place(host, namespace) {
                    Place::InCluster { fqdn, .. } => *host = fqdn,
                    Place::External { ip: true, .. } => {
                        return Err(format!("--host {host}: a name, not an address"))
                    }
                    Place::External { .. } => {}
                }
            }
        }
    }
    Ok(hosts)
}

pub fn render(
    router: &Plan,
    filter_config: &Value,
    opts: &Options,
) -> Result<Vec<Document>, String> {
    let backends = backends(router, &opts.namespace)?;
    let mut names = Names::default();
    let mut documents = vec![match opts.install {
        Install::EnvoyFilter => envoy_filter(filter_config, opts),
        Install::WasmPlugin => wasm_plugin(filter_config, opts),
    }];
    if opts.mode == Mode::Sidecar {
        documents.extend(front_services(opts));
    }
    documents.push(virtual_service(router, opts));
    for backend in &backends {
        if let Place::External { .. } = backend.place {
            documents.push(service_entry(backend, opts, &mut names));
        }
    }
    for backend in &backends {
        documents.push(destination_rule(backend, opts, &mut names));
    }
    Ok(documents)
}

/// The host the mesh knows a backend by: the Service's full name, the outside name, or for an
/// IP address a made-up name its ServiceEntry gives it (Istio hosts are names).
pub fn mesh_host(place: &Place) -> String {
    match place {
        Place::InCluster { fqdn, .. } => fqdn.clone(),
        Place::External { host, ip: false } => host.clone(),
        Place::External { host, ip: true } => {
            let label = match host.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) => v4.octets().map(|o| o.to_string()).join("-"),
                Ok(std::net::IpAddr::V6(v6)) => v6.segments().map(|s| format!("{s:x}")).join("-"),
                Err(_) => host.replace(['.', ':'], "-"),
            };
            format!("ip-{label}.jairouter.internal")
        }
    }
}

fn selector_labels(opts: &Options) -> Value {
    Value::Object(
        opts.selector
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect(),
    )
}

/// The wasm filter's Envoy configuration: the standalone gateway's (same name, root id, VM id,
/// JSON configuration, fail closed, `allow_on_headers_stop_iteration`), with the module fetched
/// by the istio-agent instead of read from a local path.
pub fn wasm_filter_config(filter_config: &Value, wasm: &Wasm) -> Value {
    let mut config = plugin_config(filter_config, "");
    config["vm_config"]["code"] = match &wasm.source {
        WasmSource::File(path) => json!({"local": {"filename": path}}),
        WasmSource::Oci(url) | WasmSource::Http(url) => {
            // The istio-agent intercepts this ECDS resource, downloads the module (an OCI image
            // or a URL), checks the sha256 when given and rewrites it to a local file before
            // Envoy sees it; the cluster is never used (Istio's own WasmPlugins say "_" too).
            let mut remote = json!({"http_uri": {"uri": url, "cluster": "_", "timeout": "30s"}});
            if let Some(sha) = &wasm.sha256 {
                remote["sha256"] = json!(sha);
            }
            json!({"remote": remote})
        }
    };
    json!({"@type": WASM_FILTER_TYPE, "config": config})
}

const ENVOY_FILTER_COMMENT: &str = "\
The JAiRouter filter, as an EnvoyFilter so it can set allow_on_headers_stop_iteration (a WasmPlugin
cannot: see k8s/istio/README.md). Three kinds of patch:
- EXTENSION_CONFIG: the wasm filter's configuration, served over ECDS; the istio-agent downloads
  the module. Editing the JSON in configuration.value is a live reload: istiod pushes it through
  ECDS, Envoy swaps it in without touching the listener, and refuses (keeping the last good one)
  a configuration the filter rejects.
- HTTP_FILTER: the filter in the HTTP connection manager, inserted just before the router, so
  after Istio's authentication, authorization and stats filters (a request an AuthorizationPolicy
  denies costs no body read and no rate-limit token) and before routing (the filter names the
  instance in x-jairouter-cluster and re-selects the route). It is disabled by default ...
- VIRTUAL_HOST: ... and switched on only in the virtual hosts of our hosts, so other traffic
  through the same proxies never meets it. There Envoy also reports retries to the filter
  (x-envoy-attempt-count), which counts a first attempt that had to be retried as a failure.";

fn envoy_filter(filter_config: &Value, opts: &Options) -> Document {
    let context = opts.context();
    let mut patches = vec![
        json!({
            "applyTo": "EXTENSION_CONFIG",
            "match": {"context": context},
            "patch": {
                "operation": "ADD",
                "value": {"name": NAME, "typed_config": wasm_filter_config(filter_config, &opts.wasm)}
            }
        }),
        json!({
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": context,
                "listener": {"filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"}
                }}}
            },
            "patch": {
                "operation": "INSERT_BEFORE",
                "value": {
                    "name": NAME,
                    "disabled": true,
                    "config_discovery": {
                        // Wait for the module rather than serve without the filter.
                        "config_source": {"ads": {}, "initial_fetch_timeout": "0s"},
                        "type_urls": [WASM_FILTER_TYPE]
                    }
                }
            }
        }),
    ];
    for host in &opts.hosts {
        patches.push(json!({
            "applyTo": "VIRTUAL_HOST",
            "match": {"context": context, "routeConfiguration": {"vhost": {"domainName": host}}},
            "patch": {
                "operation": "MERGE",
                "value": {
                    "include_attempt_count_in_response": true,
                    "typed_per_filter_config": {NAME: {
                        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                        "config": {}
                    }}
                }
            }
        }));
    }
    let mut spec = json!({"configPatches": patches});
    if !opts.selector.is_empty() {
        spec["workloadSelector"] = json!({"labels": selector_labels(opts)});
    }
    Document::with_comment(
        ENVOY_FILTER_COMMENT,
        json!({
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": metadata(NAME, &opts.proxy_namespace),
            "spec": spec
        }),
    )
}

const WASM_PLUGIN_COMMENT: &str = "\
LIMITATION: Istio's WasmPlugin cannot set allow_on_headers_stop_iteration (istio/api has no field
for it; Envoy's default is false), so the filter cannot pause in the request headers to read the
model from the body: such requests HANG. This variant only serves clients that send the model in
the x-jairouter-model header (and GET /v1/models). Use the default EnvoyFilter variant otherwise.
phase STATS: after Istio's authentication and authorization filters (a denied request costs no
body read or rate-limit token), before the router (the filter's x-jairouter-cluster re-selects
the route). match CLIENT: a gateway's and a sidecar's outbound traffic (SERVER is a sidecar's
inbound; Istio's API says gateways take CLIENT). The plugin runs on every route of the selected
proxies (a WasmPlugin cannot be switched per virtual host): dedicate them to JAiRouter.
Editing pluginConfig is a live reload (istiod pushes it through ECDS).";

fn wasm_plugin(filter_config: &Value, opts: &Options) -> Document {
    let mut traffic = json!({"mode": "CLIENT"});
    if opts.mode == Mode::Sidecar {
        traffic["ports"] = json!([{"number": SIDECAR_PORT}]);
    }
    let mut spec = json!({
        "url": opts.wasm.url(),
        "imagePullPolicy": "IfNotPresent",
        "pluginName": NAME,
        "phase": "STATS",
        "failStrategy": "FAIL_CLOSE",
        "type": "HTTP",
        "match": [traffic],
        "pluginConfig": filter_config
    });
    if let Some(sha) = &opts.wasm.sha256 {
        spec["sha256"] = json!(sha);
    }
    if !opts.selector.is_empty() {
        spec["selector"] = json!({"matchLabels": selector_labels(opts)});
    }
    Document::with_comment(
        WASM_PLUGIN_COMMENT,
        json!({
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": metadata(NAME, &opts.proxy_namespace),
            "spec": spec
        }),
    )
}

/// Sidecar mode: a Service without selector for each in-cluster host clients call, so the name
/// resolves and the client's sidecar has a virtual host for it; it has no endpoints, because
/// the VirtualService sends every request elsewhere.
fn front_services(opts: &Options) -> Vec<Document> {
    opts.hosts
        .iter()
        .filter_map(|host| match place(host, &opts.namespace) {
            Place::InCluster {
                service, namespace, ..
            } => Some(Document::with_comment(
                "The name clients call; the VirtualService routes every request sent to it.",
                json!({
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": metadata(&service, &namespace),
                    "spec": {"ports": [{
                        "name": "http",
                        "port": SIDECAR_PORT,
                        "protocol": "TCP",
                        "appProtocol": "http"
                    }]}
                }),
            )),
            Place::External { .. } => None,
        })
        .collect()
}

const VIRTUAL_SERVICE_COMMENT: &str = "\
One route per instance: the filter names the instance in x-jairouter-cluster (after removing any
client-supplied one) and the route sends the request to its host and port. The filter already set
:path (base-url prefix included), so there is no path rewrite; the authority becomes the backend's
host. Our headers never reach a backend. The last route answers what the filter did not route.";

fn virtual_service(router: &Plan, opts: &Options) -> Document {
    let mut http: Vec<Value> = instances_with_service(router)
        .into_iter()
        .map(|(service, instance)| {
            let url = &instance.spec.base_url;
            let mut route = json!({
                "name": instance.spec.cluster,
                "match": [{"headers": {ROUTING_HEADER: {"exact": instance.spec.cluster}}}],
                "route": [{"destination": {
                    "host": mesh_host(&place(&url.host, &opts.namespace)),
                    "port": {"number": url.port}
                }}],
                "rewrite": {"authority": url.host},
                "headers": {"request": {"remove": [ROUTING_HEADER, MODEL_HEADER]}},
                // Istio retries twice by default; the service's own number rules here.
                "retries": if service.spec.retries > 0 {
                    json!({
                        "attempts": service.spec.retries,
                        "retryOn": format!("{},{RETRIABLE_STATUS}", RETRY_ON.join(","))
                    })
                } else {
                    json!({"attempts": 0})
                }
            });
            // Istio's default is no timeout, which generations that stream for minutes need.
            if router.spec.request_timeout_ms > 0 {
                route["timeout"] = json!(duration(router.spec.request_timeout_ms));
            }
            route
        })
        .collect();
    http.push(json!({
        "name": "unrouted",
        "directResponse": {"status": 503, "body": {"string": UNROUTED_BODY}},
        "headers": {"response": {"set": {"content-type": "application/json"}}}
    }));
    let mut spec = json!({"hosts": opts.hosts, "http": http});
    if let Some(gateway) = &opts.gateway {
        spec["gateways"] = json!([gateway]);
    }
    Document::with_comment(
        VIRTUAL_SERVICE_COMMENT,
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": metadata(NAME, &opts.namespace),
            "spec": spec
        }),
    )
}

/// A backend outside the mesh: DNS names are resolved by the proxies; an IP address is the
/// endpoint of a made-up host name. https ports are declared HTTPS and get TLS from the
/// DestinationRule (the proxy originates TLS: the route itself carries plain HTTP).
fn service_entry(backend: &Backend, opts: &Options, names: &mut Names) -> Document {
    let host = mesh_host(&backend.place);
    let ports: Vec<Value> = backend
        .ports
        .iter()
        .map(|(port, tls)| {
            let protocol = if *tls { "HTTPS" } else { "HTTP" };
            json!({"number": port, "name": format!("{}-{port}", protocol.to_lowercase()), "protocol": protocol})
        })
        .collect();
    let mut spec = json!({
        "hosts": [host],
        "location": "MESH_EXTERNAL",
        "ports": ports,
        "resolution": "DNS"
    });
    if let Place::External { ip: true, .. } = backend.place {
        spec["resolution"] = json!("STATIC");
        spec["endpoints"] = json!([{"address": backend.host}]);
    }
    let name = names.name(&format!("{NAME}-{host}"), &host);
    Document::new(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": metadata(&name, &opts.namespace),
        "spec": spec
    }))
}

/// Ejects an endpoint after the instance's breaker threshold of consecutive 5xx, for the
/// breaker's open time: in a mesh this replaces the standalone gateway's health checker (Istio
/// has no active checks); the filter's own breakers keep working inside each proxy. Instances
/// sharing a host share the strictest of their breakers.
fn outlier_detection(backend: &Backend) -> Option<Value> {
    let breakers: Vec<&CircuitBreakerPolicy> = backend
        .instances
        .iter()
        .filter_map(|i| i.spec.circuit_breaker.as_ref())
        .filter(|b| b.enabled)
        .collect();
    let threshold = breakers.iter().map(|b| b.failure_threshold).min()?;
    let open_ms = breakers.iter().map(|b| b.timeout_ms).max()?;
    Some(json!({
        "consecutive5xxErrors": threshold,
        "interval": "10s",
        "baseEjectionTime": duration(open_ms),
        "maxEjectionPercent": 100
    }))
}

fn tls_origination(backend: &Backend) -> Value {
    let mut tls = json!({"mode": "SIMPLE"});
    if let Place::External { ip: true, .. } = backend.place {
        // No SNI for an address; the certificate is checked against the system's CAs.
        return tls;
    }
    tls["sni"] = json!(backend.host);
    tls["subjectAltNames"] = json!([backend.host]);
    tls
}

fn destination_rule(backend: &Backend, opts: &Options, names: &mut Names) -> Document {
    let host = mesh_host(&backend.place);
    let outlier = outlier_detection(backend);
    let tls_ports = backend.ports.values().filter(|tls| **tls).count();
    let mut policy = json!({});
    if let Some(outlier) = &outlier {
        policy["outlierDetection"] = outlier.clone();
    }
    if tls_ports == backend.ports.len() {
        policy["tls"] = tls_origination(backend);
    } else if tls_ports > 0 {
        // Port-level settings replace the host's for their port entirely, so each carries
        // the outlier detection too.
        let ports: Vec<Value> = backend
            .ports
            .iter()
            .map(|(port, tls)| {
                let mut setting = json!({"port": {"number": port}});
                if let Some(outlier) = &outlier {
                    setting["outlierDetection"] = outlier.clone();
                }
                if *tls {
                    setting["tls"] = tls_origination(backend);
                }
                setting
            })
            .collect();
        policy["portLevelSettings"] = json!(ports);
    }
    let mut spec = json!({"host": host});
    if policy.as_object().is_some_and(|p| !p.is_empty()) {
        spec["trafficPolicy"] = policy;
    }
    let name = names.name(&format!("{NAME}-{host}"), &host);
    // Istio looks for a host's DestinationRule in the client's namespace, then the host's (the
    // Service's, or the ServiceEntry's), then the root namespace: the host's serves every client.
    let namespace = match &backend.place {
        Place::InCluster { namespace, .. } => namespace,
        Place::External { .. } => &opts.namespace,
    };
    Document::new(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": metadata(&name, namespace),
        "spec": spec
    }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, flags, of_kind, parse};
    use super::*;

    const CONFIG: &str = r#"
model:
  circuit-breaker: {failure-threshold: 4, timeout: 20000}
  retries: 1
  request-timeout: 300000
  services:
    chat:
      retries: 3
      instances:
        - {name: llama, base-url: "http://ollama:11434", instance-id: ollama-0}
        - {name: llama, base-url: "http://vllm.models.svc:8000/serving", instance-id: vllm}
        - {name: gpt, base-url: "https://api.example.com/v1x", instance-id: hosted}
        - {name: gpt, base-url: "http://10.1.2.3:9000", instance-id: by-ip, circuit-breaker: {enabled: false}}
    embedding:
      instances:
        - {name: embed, base-url: "http://ollama:11434", instance-id: ollama-embed}
"#;

    fn render_with(args: &[&str]) -> (Value, Vec<Value>) {
        let (filter_config, router) = config(CONFIG);
        let mut all = vec![
            "--wasm-url",
            "oci://registry.example/jairouter:1",
            "--namespace",
            "llm",
        ];
        all.extend_from_slice(args);
        let opts = Options::from_flags(&flags(&COMMAND, &all).unwrap()).unwrap();
        let documents = render(&router, &filter_config, &opts).unwrap();
        (filter_config, parse(&documents))
    }

    fn gateway() -> (Value, Vec<Value>) {
        render_with(&["--gateway", "istio-system/llm", "--host", "llm.example.com"])
    }

    fn route<'a>(docs: &'a [Value], cluster: &str) -> &'a Value {
        let vs = of_kind(docs, "VirtualService")[0];
        vs["spec"]["http"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == cluster)
            .unwrap()
    }

    #[test]
    fn one_route_per_instance_to_its_host_and_port() {
        let (_, docs) = gateway();
        let expected = [
            (
                "jairouter-ollama-0",
                "ollama.llm.svc.cluster.local",
                11434,
                "ollama",
            ),
            (
                "jairouter-vllm",
                "vllm.models.svc.cluster.local",
                8000,
                "vllm.models.svc",
            ),
            (
                "jairouter-hosted",
                "api.example.com",
                443,
                "api.example.com",
            ),
            (
                "jairouter-by-ip",
                "ip-10-1-2-3.jairouter.internal",
                9000,
                "10.1.2.3",
            ),
            (
                "jairouter-ollama-embed",
                "ollama.llm.svc.cluster.local",
                11434,
                "ollama",
            ),
        ];
        for (cluster, host, port, authority) in expected {
            let r = route(&docs, cluster);
            assert_eq!(r["match"][0]["headers"][ROUTING_HEADER]["exact"], cluster);
            assert_eq!(r["route"][0]["destination"]["host"], host, "{cluster}");
            assert_eq!(r["route"][0]["destination"]["port"]["number"], port);
            assert_eq!(r["rewrite"]["authority"], authority);
            assert_eq!(
                r["headers"]["request"]["remove"],
                json!([ROUTING_HEADER, MODEL_HEADER])
            );
            assert_eq!(r["timeout"], "300s");
            // No path rewrite: the filter set :path with the base-url prefix.
            assert!(r.get("rewrite").unwrap().get("uri").is_none());
        }
        assert_eq!(route(&docs, "jairouter-vllm")["retries"]["attempts"], 3);
        assert_eq!(
            route(&docs, "jairouter-vllm")["retries"]["retryOn"],
            "connect-failure,refused-stream,reset,5xx,429"
        );
        assert_eq!(
            route(&docs, "jairouter-ollama-embed")["retries"]["attempts"],
            1
        );

        let vs = of_kind(&docs, "VirtualService")[0];
        assert_eq!(vs["spec"]["gateways"], json!(["istio-system/llm"]));
        assert_eq!(vs["spec"]["hosts"], json!(["llm.example.com"]));
        let last = vs["spec"]["http"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert!(last.get("match").is_none());
        assert_eq!(last["directResponse"]["status"], 503);
        let body: Value =
            serde_json::from_str(last["directResponse"]["body"]["string"].as_str().unwrap())
                .unwrap();
        assert_eq!(body["error"]["code"], "gateway_unavailable");
    }

    #[test]
    fn service_entries_only_for_hosts_outside_the_cluster() {
        let (_, docs) = gateway();
        let entries = of_kind(&docs, "ServiceEntry");
        let hosts: Vec<&Value> = entries.iter().map(|e| &e["spec"]["hosts"][0]).collect();
        // In the order of the configured hosts.
        assert_eq!(
            hosts,
            [
                &json!("ip-10-1-2-3.jairouter.internal"),
                &json!("api.example.com")
            ]
        );
        let hosted = entries[1];
        assert_eq!(hosted["spec"]["resolution"], "DNS");
        assert_eq!(hosted["spec"]["location"], "MESH_EXTERNAL");
        assert_eq!(
            hosted["spec"]["ports"],
            json!([{"number": 443, "name": "https-443", "protocol": "HTTPS"}])
        );
        let by_ip = entries[0];
        assert_eq!(by_ip["spec"]["resolution"], "STATIC");
        assert_eq!(by_ip["spec"]["endpoints"], json!([{"address": "10.1.2.3"}]));
        assert_eq!(by_ip["spec"]["ports"][0]["protocol"], "HTTP");
    }

    #[test]
    fn destination_rules_originate_tls_for_https_and_eject_failing_endpoints() {
        let (_, docs) = gateway();
        let rules = of_kind(&docs, "DestinationRule");
        let rule = |host: &str| {
            rules
                .iter()
                .find(|r| r["spec"]["host"] == host)
                .unwrap_or_else(|| panic!("{host}"))
        };
        let hosted = &rule("api.example.com")["spec"]["trafficPolicy"];
        assert_eq!(
            hosted["tls"],
            json!({"mode": "SIMPLE", "sni": "api.example.com", "subjectAltNames": ["api.example.com"]})
        );
        assert_eq!(hosted["outlierDetection"]["consecutive5xxErrors"], 4);
        assert_eq!(hosted["outlierDetection"]["baseEjectionTime"], "20s");
        let ollama = &rule("ollama.llm.svc.cluster.local")["spec"];
        assert!(ollama["trafficPolicy"].get("tls").is_none());
        assert_eq!(
            ollama["trafficPolicy"]["outlierDetection"]["maxEjectionPercent"],
            100
        );
        // Its breaker is off: no ejection either.
        assert!(rule("ip-10-1-2-3.jairouter.internal")["spec"]
            .get("trafficPolicy")
            .is_none());
        // Where Istio looks for them: the Service's namespace, or the ServiceEntry's.
        assert_eq!(
            rule("vllm.models.svc.cluster.local")["metadata"]["namespace"],
            "models"
        );
        assert_eq!(rule("api.example.com")["metadata"]["namespace"], "llm");
        assert_eq!(
            rule("ollama.llm.svc.cluster.local")["metadata"]["name"],
            "jairouter-ollama-llm-svc-cluster-local"
        );
        let entry = of_kind(&docs, "ServiceEntry")[1];
        assert_eq!(
            entry["metadata"]["name"],
            rule("api.example.com")["metadata"]["name"]
        );
    }

    #[test]
    fn a_host_mixing_http_and_https_gets_port_level_tls() {
        let (_, router) = config(
            r#"
services:
  chat:
    instances:
      - {name: a, base-url: "https://h.example.com"}
      - {name: b, base-url: "http://h.example.com:8080"}
"#,
        );
        let backends = backends(&router, "x").unwrap();
        let opts = Options::from_flags(
            &flags(&COMMAND, &["--wasm-url", "oci://r/i", "--gateway", "g"]).unwrap(),
        )
        .unwrap();
        let rule = destination_rule(&backends[0], &opts, &mut Names::default()).value;
        let ports = &rule["spec"]["trafficPolicy"]["portLevelSettings"];
        assert_eq!(ports[0]["port"]["number"], 443);
        assert_eq!(ports[0]["tls"]["mode"], "SIMPLE");
        assert_eq!(ports[0]["outlierDetection"]["consecutive5xxErrors"], 5);
        assert_eq!(ports[1]["port"]["number"], 8080);
        assert!(ports[1].get("tls").is_none());
        assert!(rule["spec"]["trafficPolicy"].get("tls").is_none());
    }

    #[test]
    fn an_https_service_in_the_cluster_gets_tls_but_no_service_entry() {
        let (filter_config, router) =
            config("services:\n  chat:\n    instances:\n      - {name: m, base-url: \"https://vllm.models.svc:8443\"}\n");
        let opts = Options::from_flags(
            &flags(&COMMAND, &["--wasm-url", "oci://r/i", "--gateway", "g"]).unwrap(),
        )
        .unwrap();
        let docs = parse(&render(&router, &filter_config, &opts).unwrap());
        assert!(of_kind(&docs, "ServiceEntry").is_empty());
        let rule = of_kind(&docs, "DestinationRule")[0];
        assert_eq!(rule["metadata"]["namespace"], "models");
        assert_eq!(rule["spec"]["host"], "vllm.models.svc.cluster.local");
        assert_eq!(
            rule["spec"]["trafficPolicy"]["tls"]["sni"],
            "vllm.models.svc"
        );
    }

    fn filter_config_of(wasm: &Value) -> Value {
        assert_eq!(wasm["@type"], WASM_FILTER_TYPE);
        let config = &wasm["config"];
        assert_eq!(
            config["configuration"]["@type"],
            "type.googleapis.com/google.protobuf.StringValue"
        );
        serde_json::from_str(config["configuration"]["value"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn the_envoy_filter_carries_the_filter_configuration_and_the_stop_iteration_switch() {
        let (filter_config, docs) = gateway();
        let filter = of_kind(&docs, "EnvoyFilter")[0];
        assert_eq!(filter["metadata"]["namespace"], "istio-system");
        assert_eq!(
            filter["spec"]["workloadSelector"]["labels"],
            json!({"istio": "ingressgateway"})
        );
        let patches = filter["spec"]["configPatches"].as_array().unwrap();
        let ecds = &patches[0];
        assert_eq!(ecds["applyTo"], "EXTENSION_CONFIG");
        assert_eq!(ecds["match"]["context"], "GATEWAY");
        let wasm = &ecds["patch"]["value"]["typed_config"];
        let parsed = filter_config_of(wasm);
        assert_eq!(parsed, filter_config);
        Plan::from_value(&parsed).unwrap();
        assert_eq!(wasm["config"]["allow_on_headers_stop_iteration"], true);
        assert_eq!(wasm["config"]["vm_config"]["vm_id"], "jairouter");
        assert_eq!(
            wasm["config"]["vm_config"]["code"]["remote"]["http_uri"]["uri"],
            "oci://registry.example/jairouter:1"
        );

        let http_filter = &patches[1];
        assert_eq!(http_filter["applyTo"], "HTTP_FILTER");
        assert_eq!(http_filter["patch"]["operation"], "INSERT_BEFORE");
        assert_eq!(
            http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
            "envoy.filters.http.router"
        );
        assert_eq!(http_filter["patch"]["value"]["disabled"], true);
        assert_eq!(
            http_filter["patch"]["value"]["name"],
            ecds["patch"]["value"]["name"]
        );

        let vhost = &patches[2];
        assert_eq!(vhost["applyTo"], "VIRTUAL_HOST");
        assert_eq!(
            vhost["match"]["routeConfiguration"]["vhost"]["domainName"],
            "llm.example.com"
        );
        assert!(vhost["patch"]["value"]["typed_per_filter_config"]
            .get(NAME)
            .is_some());
        assert_eq!(patches.len(), 3);
    }

    #[test]
    fn the_wasm_plugin_variant_carries_the_configuration_as_structured_yaml() {
        let (filter_config, docs) = render_with(&[
            "--gateway",
            "g",
            "--install",
            "wasmplugin",
            "--wasm-sha256",
            &"a".repeat(64),
        ]);
        assert!(of_kind(&docs, "EnvoyFilter").is_empty());
        let plugin = of_kind(&docs, "WasmPlugin")[0];
        assert_eq!(plugin["spec"]["pluginConfig"], filter_config);
        Plan::from_value(&plugin["spec"]["pluginConfig"]).unwrap();
        assert_eq!(plugin["spec"]["phase"], "STATS");
        assert_eq!(plugin["spec"]["match"], json!([{"mode": "CLIENT"}]));
        assert_eq!(
            plugin["spec"]["selector"]["matchLabels"],
            json!({"istio": "ingressgateway"})
        );
        assert_eq!(plugin["spec"]["url"], "oci://registry.example/jairouter:1");
        assert_eq!(plugin["spec"]["sha256"], "a".repeat(64));
        let vs = of_kind(&docs, "VirtualService")[0];
        assert_eq!(vs["spec"]["gateways"], json!(["llm/g"]));
        assert_eq!(vs["spec"]["hosts"], json!(["*"]));
    }

    #[test]
    fn sidecar_mode_serves_a_mesh_host_from_the_clients_sidecars() {
        let (_, docs) = render_with(&["--mode", "sidecar", "--selector", "app=chat-ui"]);
        let filter = of_kind(&docs, "EnvoyFilter")[0];
        assert_eq!(filter["metadata"]["namespace"], "llm");
        assert_eq!(
            filter["spec"]["workloadSelector"]["labels"],
            json!({"app": "chat-ui"})
        );
        for patch in filter["spec"]["configPatches"].as_array().unwrap() {
            assert_eq!(patch["match"]["context"], "SIDECAR_OUTBOUND");
        }
        let vs = of_kind(&docs, "VirtualService")[0];
        assert_eq!(vs["spec"]["hosts"], json!(["llm.llm.svc.cluster.local"]));
        assert!(vs["spec"].get("gateways").is_none());
        let service = of_kind(&docs, "Service")[0];
        assert_eq!(service["metadata"]["name"], "llm");
        assert!(service["spec"].get("selector").is_none());

        let (_, docs) = render_with(&["--mode", "sidecar", "--install", "wasmplugin"]);
        let plugin = of_kind(&docs, "WasmPlugin")[0];
        assert_eq!(
            plugin["spec"]["match"],
            json!([{"mode": "CLIENT", "ports": [{"number": 80}]}])
        );
        assert!(plugin["spec"].get("selector").is_none());
    }

    #[test]
    fn options_are_checked() {
        let opts = |args: &[&str]| flags(&COMMAND, args).and_then(|f| Options::from_flags(&f));
        assert!(opts(&["--wasm-url", "oci://r/i"])
            .err()
            .unwrap()
            .contains("--gateway"));
        assert!(opts(&[
            "--wasm-url",
            "oci://r/i",
            "--mode",
            "sidecar",
            "--gateway",
            "g"
        ])
        .is_err());
        assert!(opts(&["--wasm-url", "oci://r/i", "--mode", "edge"]).is_err());
        assert!(opts(&[
            "--wasm-url",
            "oci://r/i",
            "--gateway",
            "g",
            "--selector",
            "novalue"
        ])
        .is_err());
        assert!(opts(&[
            "--wasm-url",
            "oci://r/i",
            "--gateway",
            "g",
            "--xds-listener",
            "x"
        ])
        .is_err());
        assert!(opts(&[
            "--wasm-url",
            "oci://r/i",
            "--gateway",
            "g",
            "--host",
            "a:80"
        ])
        .is_err());
        let file = opts(&["--wasm-url", "file:///opt/f.wasm", "--gateway", "g"]).unwrap();
        let wasm = wasm_filter_config(&json!({}), &file.wasm);
        assert_eq!(
            wasm["config"]["vm_config"]["code"],
            json!({"local": {"filename": "/opt/f.wasm"}})
        );
    }
}
