//! The Envoy bootstrap for the standalone gateway, rendered from the router configuration so
//! one file is the single source of truth: a listener whose HTTP chain is our wasm filter and
//! the router, a route that sends each request to the cluster the filter named, and one cluster
//! per configured instance.

use jairouter_filter::config::{BaseUrl, EdgeLimits, Jwks, JwtOptions};
use jairouter_filter::contract::{
    HEALTH_ROOT_ID, JWT_PAYLOAD_KEY, LOG_SUMMARY_FILTER_STATE, MODEL_HEADER, RATE_LIMIT_CLUSTER,
    ROUTING_HEADER, STATUS_ROOT_ID,
};
use jairouter_filter::metrics::TAGS;
use jairouter_filter::plan::{Instance, Plan, Service};
use serde_json::{json, Value};

use crate::envoy_json::{
    duration, plugin_config, service_cluster, socket, tls_socket, WASM_FILTER_TYPE,
};
use crate::tracing;

pub struct Options {
    pub listen_address: String,
    pub port: u16,
    pub admin_address: String,
    pub admin_port: u16,
    /// Absolute path of the built `.wasm`.
    pub wasm_path: String,
    /// CA bundle for https backends.
    pub ca_file: String,
    /// Where the JSON access log goes (`/dev/stdout` in containers; `none` for no access log).
    pub access_log: String,
    /// The status page's port on the admin address (`None`: no status listener).
    pub status_port: Option<u16>,
    /// Probes and metrics for the orchestrator, on the listen address (`None`: none):
    /// `GET /ready` (503 once the gateway is draining) and `GET /stats/prometheus`.
    pub metrics_port: Option<u16>,
    /// Live configuration: the filter's configuration and the clusters are files in this
    /// directory that Envoy watches (file-based ECDS and CDS), rewritten by `watch`.
    pub live_dir: Option<String>,
}

/// Where, under the live directory, each watched file lives (each in its own directory: Envoy
/// re-reads a file when one is moved into its watched directory).
pub const LIVE_FILTER: &str = "filter/filter.json";
pub const LIVE_CLUSTERS: &str = "clusters/clusters.json";

/// Envoy may read up to this much more than the filter's scan limit before the filter sees it;
/// past the connection buffer limit Envoy answers 413 itself, with a body that is not ours.
const BUFFER_HEADROOM: u64 = 2 * 1024 * 1024;

pub fn render(config: &Plan, model_json: &Value, opts: &Options) -> Value {
    let buffer_limit = config
        .spec
        .gateway
        .max_body_bytes
        .saturating_add(BUFFER_HEADROOM);
    let mut static_clusters = Vec::new();
    if let Some(global) = &config.spec.gateway.global_rate_limit {
        static_clusters.push(rate_limit_cluster(&global.service));
    }
    if let Some(Jwks::Remote { url, .. }) = config.spec.gateway.jwt.as_ref().map(|j| &j.jwks) {
        static_clusters.push(jwks_cluster(url, &opts.ca_file));
    }
    if let Some(tracing) = &config.spec.tracing {
        static_clusters.push(tracing::collector_cluster(tracing, &opts.ca_file));
    }
    let mut listeners = vec![json!({
        "name": "jairouter",
        "address": socket(&opts.listen_address, opts.port),
        "per_connection_buffer_limit_bytes": buffer_limit,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": http_connection_manager(config, model_json, opts, buffer_limit)
        }]}]
    })];
    if let Some(port) = opts.status_port {
        listeners.push(status_listener(&opts.admin_address, port, &opts.wasm_path));
    }
    if let Some(port) = opts.metrics_port {
        listeners.push(metrics_listener(&opts.listen_address, port));
        static_clusters.push(admin_cluster(&opts.admin_address, opts.admin_port));
    }
    let mut bootstrap = json!({
        "node": {"id": "jairouter", "cluster": "jairouter"},
        // The filter's metrics carry labels in their names (`<name>.<tag>=<value>;`).
        "stats_config": {"stats_tags": stats_tags()},
        // Clients filling `gateway.max-connections` must not lock the operator out.
        "admin": {
            "address": socket(&opts.admin_address, opts.admin_port),
            "ignore_global_conn_limit": true
        },
        "overload_manager": overload_manager(&config.spec.gateway.edge),
        "static_resources": {
            "listeners": listeners,
            "clusters": static_clusters
        }
    });
    match &opts.live_dir {
        Some(dir) => {
            bootstrap["dynamic_resources"] = json!({
                "cds_config": watched_file(dir, LIVE_CLUSTERS)
            });
            // A reload may add health checks: the checker always runs (idle without targets).
            bootstrap["bootstrap_extensions"] = json!([health_checker(&opts.wasm_path)]);
        }
        None => {
            if let Some(list) = bootstrap["static_resources"]["clusters"].as_array_mut() {
                list.extend(instance_clusters(config, opts));
            }
            if config.instances().any(|i| i.spec.health_check.is_some()) {
                bootstrap["bootstrap_extensions"] = json!([health_checker(&opts.wasm_path)]);
            }
        }
    }
    bootstrap
}

/// `gateway.max-connections`: Envoy's global limit on downstream connections (its edge
/// guidance, and it warns at start without one). Only the API listener counts: the status page,
/// probes and metrics listeners opt out, so a flood of clients does not fail a pod's readiness
/// or hide it from Prometheus.
fn overload_manager(edge: &EdgeLimits) -> Value {
    json!({"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": edge.max_connections
        }
    }]})
}

/// The clusters of every configured instance.
pub fn instance_clusters(config: &Plan, opts: &Options) -> Vec<Value> {
    config
        .services()
        .flat_map(|service| {
            service
                .instances
                .iter()
                .map(move |i| cluster(i, &failover_peers(service, i), opts))
        })
        .collect()
}

/// The live clusters file (CDS): a discovery response of the instances' clusters.
pub fn clusters_resource(clusters: &[Value]) -> Value {
    let resources: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            c
        })
        .collect();
    json!({"resources": resources})
}

/// The live filter file (ECDS): the wasm filter with this configuration.
pub fn filter_resource(model_json: &Value, wasm_path: &str) -> Value {
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": "jairouter",
        "typed_config": wasm_filter_config(model_json, wasm_path)
    }]})
}

fn wasm_filter_config(model_json: &Value, wasm_path: &str) -> Value {
    json!({
        "@type": WASM_FILTER_TYPE,
        "config": plugin_config(model_json, wasm_path)
    })
}

fn watched_file(dir: &str, file: &str) -> Value {
    let path = format!("{}/{file}", dir.trim_end_matches('/'));
    let watched = path
        .rsplit_once('/')
        .map_or(dir.to_string(), |(d, _)| d.to_string());
    json!({
        "path_config_source": {"path": path, "watched_directory": {"path": watched}},
        "resource_api_version": "V3"
    })
}

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

fn router_filter() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    })
}

const ADMIN_CLUSTER: &str = "jairouter-admin";

/// What a kubelet and a Prometheus reach, without exposing Envoy's admin (which can stop the
/// process): `/ready` answers from Envoy's health-check filter, 200 until the admin's
/// `/healthcheck/fail` (the pod's preStop) and 503 after, so endpoints drop a draining pod
/// before it stops; `/stats/prometheus` is proxied to the admin, read-only, and nothing else is.
fn metrics_listener(address: &str, port: u16) -> Value {
    json!({
        "name": "jairouter-metrics",
        "address": socket(address, port),
        "ignore_global_conn_limit": true,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": "jairouter_metrics",
                "route_config": {"virtual_hosts": [{
                    "name": "metrics",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"path": "/stats/prometheus", "headers": [
                                {"name": ":method", "string_match": {"exact": "GET"}}
                            ]},
                            "route": {"cluster": ADMIN_CLUSTER}
                        },
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
                    ]
                }]},
                "http_filters": [
                    {
                        "name": "envoy.filters.http.health_check",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
                            "pass_through_mode": false,
                            "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}]
                        }
                    },
                    router_filter()
                ]
            }
        }]}]
    })
}

fn admin_cluster(address: &str, port: u16) -> Value {
    let address = if address == "0.0.0.0" {
        "127.0.0.1"
    } else {
        address
    };
    json!({
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(address, port)}}]}]
        }
    })
}

/// The status page: a listener on the admin address (never the public one) whose only filter
/// is ours under the status root id, answering `GET /status` from shared data.
fn status_listener(address: &str, port: u16, wasm_path: &str) -> Value {
    let mut config = plugin_config(&json!({}), wasm_path);
    config["name"] = json!(STATUS_ROOT_ID);
    config["root_id"] = json!(STATUS_ROOT_ID);
    json!({
        "name": STATUS_ROOT_ID,
        "address": socket(address, port),
        "ignore_global_conn_limit": true,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": "jairouter_status",
                "route_config": {"virtual_hosts": [{
                    "name": "status",
                    "domains": ["*"],
                    "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 404}
                    }]
                }]},
                "http_filters": [
                    {
                        "name": "envoy.filters.http.wasm",
                        "typed_config": {
                            "@type": WASM_FILTER_TYPE,
                            "config": config
                        }
                    },
                    router_filter()
                ]
            }
        }]}]
    })
}

/// One JSON line per request: Envoy's view (status, timings, upstream, flags) and the filter's
/// (`jairouter`: service, model, instance, tokens and what decided), so a failed request can be
/// explained from the log alone.
fn access_log(path: &str) -> Value {
    json!({
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": {
                "time": "%START_TIME%",
                "method": "%REQ(:METHOD)%",
                "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                "status": "%RESPONSE_CODE%",
                "details": "%RESPONSE_CODE_DETAILS%",
                "flags": "%RESPONSE_FLAGS%",
                "duration_ms": "%DURATION%",
                "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
                "bytes_in": "%BYTES_RECEIVED%",
                "bytes_out": "%BYTES_SENT%",
                "upstream": "%UPSTREAM_HOST%",
                "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
                "request_id": "%REQ(X-REQUEST-ID)%",
                "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                "jairouter": format!("%FILTER_STATE({LOG_SUMMARY_FILTER_STATE}:PLAIN)%")
            }}
        }
    })
}

/// One stats tag per label the filter writes into its metric names (`<name>.<tag>=<value>;`):
/// Envoy takes them out of the name and exports them as Prometheus labels.
fn stats_tags() -> Value {
    let tags: Vec<Value> = std::iter::once("vm")
        .chain(TAGS)
        .map(|tag| json!({"tag_name": tag, "regex": format!(r"(\.{tag}=([^;]*);)")}))
        .collect();
    Value::Array(tags)
}

/// The process's one health checker: the same module as a singleton service on the main
/// thread, with the HTTP filter's VM id so its verdicts land in the shared data the filter reads
/// (and it reads the configuration the filter publishes there).
fn health_checker(wasm_path: &str) -> Value {
    // It checks what the routing filter publishes in shared data, so it follows reloads.
    let mut config = plugin_config(&json!({}), wasm_path);
    config["name"] = json!(HEALTH_ROOT_ID);
    config["root_id"] = json!(HEALTH_ROOT_ID);
    if let Some(plugin) = config.as_object_mut() {
        plugin.remove("allow_on_headers_stop_iteration");
        plugin.remove("failure_policy");
    }
    json!({
        "name": "envoy.bootstrap.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
            "singleton": true,
            "config": config
        }
    })
}

fn http_connection_manager(
    config: &Plan,
    model_json: &Value,
    opts: &Options,
    buffer_limit: u64,
) -> Value {
    let edge = &config.spec.gateway.edge;
    let access_logs: Vec<Value> = match opts.access_log.as_str() {
        "none" => Vec::new(),
        path => vec![access_log(path)],
    };
    let mut hcm = json!({
        "@type": HCM_TYPE,
        "stat_prefix": "jairouter",
        "codec_type": "AUTO",
        // The client address is the peer's, or (with `gateway.trusted-hops`) the one the
        // trusted proxies in front wrote into X-Forwarded-For; never a header a client forges.
        "use_remote_address": true,
        "xff_num_trusted_hops": config.spec.gateway.trusted_hops,
        "access_log": access_logs,
        // Envoy's edge settings (`gateway.*`, see EdgeLimits): slow or idle clients give their
        // resources back. A 0 turns a timeout off ("0s" is off for Envoy too).
        "request_headers_timeout": duration(edge.request_headers_timeout_ms),
        "stream_idle_timeout": duration(edge.stream_idle_timeout_ms),
        "common_http_protocol_options": {"idle_timeout": duration(edge.idle_timeout_ms)},
        "max_request_headers_kb": edge.max_request_headers_kb,
        // HTTP/2 clients (h2c): a bounded number of streams a connection, and windows as large
        // as the listener's buffer limit, since an HTTP/2 stream's window is its buffer limit:
        // with Envoy's 64 KiB edge advice a 3 MiB prompt whose model comes last got no answer
        // (Envoy's own default, 256 MiB, let one stream buffer far past `max-body-bytes`).
        "http2_protocol_options": {
            "max_concurrent_streams": edge.http2_max_concurrent_streams,
            "initial_stream_window_size": buffer_limit,
            "initial_connection_window_size": buffer_limit
        },
        "route_config": api_route_config(config, opts),
        "http_filters": api_http_filters(config, model_json, opts)
    });
    if let Some(tracing) = &config.spec.tracing {
        hcm["tracing"] = tracing::connection_manager_tracing(tracing);
    }
    hcm
}

/// The API listener's filters: Envoy's JWT check when configured, ours, the router.
fn api_http_filters(config: &Plan, model_json: &Value, opts: &Options) -> Vec<Value> {
    let wasm = match &opts.live_dir {
        Some(dir) => json!({
            "name": "jairouter",
            "config_discovery": {
                "config_source": watched_file(dir, LIVE_FILTER),
                "type_urls": [WASM_FILTER_TYPE]
            }
        }),
        None => json!({
            "name": "envoy.filters.http.wasm",
            "typed_config": wasm_filter_config(model_json, &opts.wasm_path)
        }),
    };
    let mut filters: Vec<Value> = config.spec.gateway.jwt.iter().map(jwt_filter).collect();
    filters.push(wasm);
    filters.push(router_filter());
    filters
}

/// The API's routes: to the cluster the filter named, and a 503 when it named none.
fn api_route_config(config: &Plan, opts: &Options) -> Value {
    json!({
        "name": "jairouter",
        "virtual_hosts": [{
            "name": "openai",
            "domains": ["*"],
            // x-envoy-attempt-count tells the filter the chosen instance failed first.
            "include_attempt_count_in_response": true,
            "routes": [
                routed_route(config, opts),
                responses_websocket_route(),
                {
                    // Reached only if the filter did not run: never forward unrouted traffic.
                    "match": {"prefix": "/"},
                    "direct_response": {
                        "status": 503,
                        "body": {"inline_string": r#"{"error":{"message":"The routing filter did not choose an instance.","type":"server_error","param":null,"code":"gateway_unavailable"}}"#}
                    },
                    "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
                }
            ]
        }]
    })
}

/// A WebSocket handshake on the Responses API (Codex tries that transport first). Envoy refuses
/// an upgrade no route allows with a bare 403 before any filter runs, and Codex falls back to
/// HTTP only on 426: this route allows the upgrade so the filter sees the handshake and answers
/// it 426 in OpenAI's shape. Only a GET on those paths matches (a handshake is a GET; a POST
/// that asks an upgrade still gets Envoy's 403), and its action leads nowhere: the routing header
/// is never set on it, so were the filter ever not to answer, Envoy finds no cluster.
fn responses_websocket_route() -> Value {
    json!({
        "match": {
            "safe_regex": {"regex": "/(api/)?v1/responses/?"},
            "headers": [
                {"name": ":method", "string_match": {"exact": "GET"}},
                {"name": "upgrade", "string_match": {"exact": "websocket", "ignore_case": true}}
            ]
        },
        "route": {
            "cluster_header": ROUTING_HEADER,
            "upgrade_configs": [{"upgrade_type": "websocket", "enabled": true}]
        }
    })
}

/// The route of every request the filter routed: to the cluster in its routing header.
fn routed_route(config: &Plan, opts: &Options) -> Value {
    let mut routed = json!({
        "match": {"prefix": "/", "headers": [{"name": ROUTING_HEADER, "present_match": true}]},
        "route": {
            "cluster_header": ROUTING_HEADER,
            "auto_host_rewrite": true,
            // Generations run for minutes: no limit unless `request-timeout` sets one; the
            // stream idle timeout guards hangs.
            "timeout": duration(config.spec.request_timeout_ms)
        },
        // Ours, not the backend's: the routing header and the client's model header.
        "request_headers_to_remove": [ROUTING_HEADER, MODEL_HEADER]
    });
    // Live: a reload may give a service retries; the route must already have the policy.
    if opts.live_dir.is_some() || config.services().any(|s| s.spec.retries > 0) {
        routed["route"]["retry_policy"] = retry_policy(config.spec.retries);
        // `per_request_buffer_limit_bytes` until Envoy 1.40 deprecated it. This one only ever
        // raises a stream's buffer limit, so below the connection's it caps just the copy kept
        // for retries; the filter may still buffer up to `max-body-bytes` looking for the model.
        routed["request_body_buffer_limit"] = json!(RETRY_BUFFER_BYTES);
    }
    routed
}

/// Envoy keeps a copy of a request's body for retries up to this; larger bodies are not
/// retried (keeping a 4 MB prompt cost ~500 µs of CPU a request in `./build.sh bench`).
const RETRY_BUFFER_BYTES: u64 = 1024 * 1024;

/// Failed attempts move to another instance of the model: the first attempt is on the chosen
/// instance (priority 0 of its cluster), retries on its peers (priority 1) and never on a host
/// already tried. What fails: a refused or reset connection, a 5xx, and 429 (the backend's own
/// limit, which should move traffic rather than reach the client). Envoy never retries once
/// the response has begun, and only bodies it still holds (up to the buffer limit).
fn retry_policy(retries: u64) -> Value {
    json!({
        "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": retries,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1
            }
        },
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            }
        }],
        "host_selection_retry_max_attempts": 5,
        // A quick second chance: the next attempt goes elsewhere anyway.
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"}
    })
}

/// The rate-limit service the filter asks (gRPC: HTTP/2).
fn rate_limit_cluster(service: &BaseUrl) -> Value {
    json!({
        "name": RATE_LIMIT_CLUSTER,
        "type": if service.host_is_ip() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "dns_lookup_family": "V4_PREFERRED",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": RATE_LIMIT_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(&service.host, service.port)}}]}]
        }
    })
}

/// Where a failed attempt may go instead: the other instances of the same model that take the
/// same path and headers (a retry re-sends the request as the filter shaped it for the first
/// instance, credentials included) over the same scheme, and for TLS the same host (the cluster's
/// SNI and certificate check are the first instance's).
fn failover_peers<'a>(service: &'a Service, instance: &Instance) -> Vec<&'a Instance> {
    if service.spec.retries == 0 {
        return Vec::new();
    }
    service
        .instances
        .iter()
        .filter(|peer| {
            peer.spec.id != instance.spec.id
                && peer.spec.name == instance.spec.name
                && peer.spec.active
                && peer.spec.weight > 0
                && peer.spec.base_url.prefix == instance.spec.base_url.prefix
                && peer.spec.base_url.tls == instance.spec.base_url.tls
                && (!peer.spec.base_url.tls || peer.spec.base_url.host == instance.spec.base_url.host)
                && peer.spec.headers == instance.spec.headers
                // A translated request is shaped for its instance's protocol and path.
                && peer.spec.adapter == instance.spec.adapter
                && peer.spec.path_given == instance.spec.path_given
        })
        .collect()
}

fn lb_endpoint(instance: &Instance) -> Value {
    let url = &instance.spec.base_url;
    json!({
        "endpoint": {
            "address": socket(&url.host, url.port),
            // auto_host_rewrite sends the backend its own name as Host.
            "hostname": url.host
        },
        "load_balancing_weight": instance.spec.weight.max(1)
    })
}

/// One cluster per instance: the instance itself, then (priority 1, reached only by retries,
/// which move on from priorities already tried) its failover peers.
fn cluster(instance: &Instance, peers: &[&Instance], opts: &Options) -> Value {
    let url = &instance.spec.base_url;
    let all_ips = url.host_is_ip() && peers.iter().all(|p| p.spec.base_url.host_is_ip());
    let kind = if all_ips { "STATIC" } else { "STRICT_DNS" };
    let mut endpoints = vec![json!({"lb_endpoints": [lb_endpoint(instance)]})];
    if !peers.is_empty() {
        endpoints.push(json!({
            "priority": 1,
            "lb_endpoints": peers.iter().map(|p| lb_endpoint(p)).collect::<Vec<_>>()
        }));
    }
    let mut cluster = json!({
        "name": instance.spec.cluster,
        "type": kind,
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": instance.spec.cluster,
            "endpoints": endpoints
        }
    });
    if url.tls {
        cluster["transport_socket"] = tls_socket(url, &opts.ca_file);
    }
    cluster
}

const JWKS_CLUSTER: &str = "jairouter-jwks";

/// Envoy's jwt_authn in front of the filter (`gateway.jwt`): a valid token's payload goes into
/// the request's metadata, where the filter reads its claims; a missing or failed one passes on
/// without it, so the filter answers (an OpenAI-shaped 401, or an API key still works).
fn jwt_filter(jwt: &JwtOptions) -> Value {
    let mut provider = json!({
        "issuer": jwt.issuer,
        "audiences": jwt.audiences,
        "payload_in_metadata": JWT_PAYLOAD_KEY,
        // The token is the gateway's business: it never reaches a backend.
        "forward": false
    });
    match &jwt.jwks {
        Jwks::File(path) => provider["local_jwks"] = json!({"filename": path}),
        Jwks::Remote { url, cache_secs } => {
            let scheme = if url.tls { "https" } else { "http" };
            provider["remote_jwks"] = json!({
                "http_uri": {
                    "uri": format!("{scheme}://{}:{}{}", url.host, url.port, url.prefix),
                    "cluster": JWKS_CLUSTER,
                    "timeout": "5s"
                },
                "cache_duration": duration(cache_secs.saturating_mul(1000)),
                "async_fetch": {}
            });
        }
    }
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"idp": provider},
            "rules": [{
                "match": {"prefix": "/"},
                "requires": {"requires_any": {"requirements": [
                    {"provider_name": "idp"},
                    {"allow_missing_or_failed": {}}
                ]}}
            }]
        }
    })
}

/// The identity provider's key endpoint, for `jwks-uri`.
fn jwks_cluster(url: &BaseUrl, ca_file: &str) -> Value {
    service_cluster(JWKS_CLUSTER, url, ca_file)
}
