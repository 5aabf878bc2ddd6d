//! Envoy's JSON building blocks, shared by the bootstrap, its tracer and the mesh manifests: a
//! Duration, a socket address, TLS to an upstream, a cluster of one service, the wasm plugin.
//! A leaf: it uses no other module of the renderer.

use jairouter_filter::config::BaseUrl;
use jairouter_filter::contract::{ROUTER_ROOT_ID, VM_ID};
use serde_json::{json, Value};

/// The type of the wasm HTTP filter's configuration.
pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// A protobuf Duration in its JSON form, as Envoy and Istio read it (and protobuf writes it):
/// whole seconds `30s`, else milliseconds `1.500s`; `0s` for none.
pub fn duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

pub fn socket(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

/// TLS to an upstream, checking its certificate against the CA bundle and its name.
pub fn tls_socket(url: &BaseUrl, ca_file: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": url.host,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [{
                        "san_type": if url.host_is_ip() { "IP_ADDRESS" } else { "DNS" },
                        "matcher": {"exact": url.host}
                    }]
                }
            }
        }
    })
}

/// A cluster of one service the gateway calls (by name, or at its address), over TLS checked
/// against the CA bundle for https.
pub fn service_cluster(name: &str, url: &BaseUrl, ca_file: &str) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": if url.host_is_ip() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(&url.host, url.port)}}]}]
        }
    });
    if url.tls {
        cluster["transport_socket"] = tls_socket(url, ca_file);
    }
    cluster
}

/// The wasm plugin: one VM id for every worker, so shared data (the round-robin rotation) is
/// one per process.
pub fn plugin_config(model_json: &Value, wasm_path: &str) -> Value {
    json!({
        "name": ROUTER_ROOT_ID,
        "root_id": ROUTER_ROOT_ID,
        "vm_config": {
            "vm_id": VM_ID,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": wasm_path}}
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": model_json.to_string()
        },
        // A VM that died (a panic would be a bug; none is known: see filter/fuzz) is replaced
        // by a fresh one for the next request, instead of failing every request of its worker
        // (Envoy's default) until a restart.
        "failure_policy": "FAIL_RELOAD",
        // Without it, pausing in the headers phase to read the body for the model hangs.
        "allow_on_headers_stop_iteration": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_protobuf_json() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(30_000), "30s");
        assert_eq!(duration(1_500), "1.500s");
        assert_eq!(duration(5), "0.005s");
        assert_eq!(duration(3_600_000), "3600s");
    }
}
