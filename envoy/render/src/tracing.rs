//! `jairouter.tracing` in the bootstrap: Envoy's own OpenTelemetry tracer on the API listener,
//! exporting each sampled request's span over OTLP (gRPC or HTTP) to the collector, through a
//! cluster of its own. The span continues a client's W3C `traceparent` (a client that declined
//! sampling is honoured) and Envoy passes the context on to the backend. The filter's part of
//! the span (model, service, instance, tokens, the access log's summary) comes from the filter
//! state it writes, read by custom tags when Envoy finishes the span.

use crate::envoy_json::{duration, service_cluster};
use jairouter_filter::config::{OtlpProtocol, TracingOptions};
use jairouter_filter::contract::{LOG_SUMMARY_FILTER_STATE, SPAN_ATTRIBUTES, SPAN_SUMMARY};
use serde_json::{json, Value};

pub const COLLECTOR_CLUSTER: &str = "jairouter-otel-collector";

/// The HTTP connection manager's `tracing`.
pub fn connection_manager_tracing(tracing: &TracingOptions) -> Value {
    let tag = |name: &str, state: &str| json!({"tag": name, "value": format!("%FILTER_STATE({state}:PLAIN)%")});
    let mut custom_tags = vec![tag(SPAN_SUMMARY, LOG_SUMMARY_FILTER_STATE)];
    custom_tags.extend(
        SPAN_ATTRIBUTES
            .iter()
            .map(|name| tag(name, &format!("wasm.{name}"))),
    );
    json!({
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": provider(tracing)
        },
        // Requests without a trace context, and those whose client sampled them, are traced at
        // this rate; a traceparent that declined sampling is never traced.
        "random_sampling": {"value": tracing.sampling_percent},
        // The span's name, when it starts: `POST /v1/chat/completions` (no query string).
        "operation": "%REQ(:METHOD)% %PATH(WQ)%",
        // A finished span's tags (an attribute the request never got formats empty: left out).
        "custom_tags": custom_tags
    })
}

fn provider(tracing: &TracingOptions) -> Value {
    let exporter = &tracing.exporter;
    let timeout = duration(exporter.timeout_ms);
    let url = &exporter.collector;
    let mut config = json!({
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "service_name": tracing.service_name
    });
    match exporter.protocol {
        OtlpProtocol::Grpc => {
            let metadata: Vec<Value> = exporter
                .headers
                .iter()
                .map(|(key, value)| json!({"key": key, "value": value}))
                .collect();
            config["grpc_service"] = json!({
                "envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER, "authority": url.host},
                "timeout": timeout,
                "initial_metadata": metadata
            });
        }
        OtlpProtocol::HttpProtobuf => {
            let scheme = if url.tls { "https" } else { "http" };
            let headers: Vec<Value> = exporter
                .headers
                .iter()
                .map(|(key, value)| json!({"header": {"key": key, "value": value}}))
                .collect();
            config["http_service"] = json!({
                "http_uri": {
                    "uri": format!("{scheme}://{}:{}{}", url.host, url.port, url.prefix),
                    "cluster": COLLECTOR_CLUSTER,
                    "timeout": timeout
                },
                "request_headers_to_add": headers
            });
        }
    }
    if !tracing.resource.is_empty() {
        let attributes: serde_json::Map<String, Value> = tracing
            .resource
            .iter()
            .map(|(name, value)| (name.clone(), json!(value)))
            .collect();
        config["resource_detectors"] = json!([{
            "name": "envoy.tracers.opentelemetry.resource_detectors.static_config",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.tracers.opentelemetry.resource_detectors.v3.StaticConfigResourceDetectorConfig",
                "attributes": attributes
            }
        }]);
    }
    config
}

/// The collector: HTTP/2 for OTLP/gRPC, TLS (checked against the CA bundle) for https.
pub fn collector_cluster(tracing: &TracingOptions, ca_file: &str) -> Value {
    let protocol = match tracing.exporter.protocol {
        OtlpProtocol::Grpc => json!({"http2_protocol_options": {}}),
        OtlpProtocol::HttpProtobuf => json!({"http_protocol_options": {}}),
    };
    let mut cluster = service_cluster(COLLECTOR_CLUSTER, &tracing.exporter.collector, ca_file);
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": protocol
        }
    });
    cluster
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{render, Options};
    use jairouter_filter::plan::Plan;

    fn options() -> Options {
        Options {
            listen_address: "127.0.0.1".into(),
            port: 8080,
            admin_address: "127.0.0.1".into(),
            admin_port: 9901,
            wasm_path: "/filter.wasm".into(),
            ca_file: "/ca.pem".into(),
            access_log: "none".into(),
            status_port: None,
            metrics_port: None,
            live_dir: None,
        }
    }

    fn bootstrap(tracing: Option<Value>) -> Value {
        let model =
            json!({"services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}});
        let config = match tracing {
            None => model,
            Some(t) => json!({"model": model, "jairouter": {"tracing": t}}),
        };
        let plan = Plan::from_value(&config).unwrap();
        render(&plan, &config, &options())
    }

    fn hcm(bootstrap: &Value) -> &Value {
        &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]
    }

    fn collector(bootstrap: &Value) -> Option<&Value> {
        bootstrap["static_resources"]["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == COLLECTOR_CLUSTER))
    }

    #[test]
    fn off_there_is_no_tracer_and_no_collector() {
        for off in [
            None,
            Some(json!({"enabled": false, "exporter": {"type": "logging"}})),
        ] {
            let b = bootstrap(off);
            assert!(hcm(&b).get("tracing").is_none());
            assert!(collector(&b).is_none());
            assert!(!b.to_string().contains("opentelemetry"));
        }
    }

    #[test]
    fn grpc_to_the_collector_with_every_attribute_as_a_custom_tag() {
        let b = bootstrap(Some(json!({"enabled": true, "service-name": "gw",
            "sampling": {"ratio": 0.1},
            "exporter": {"otlp": {"endpoint": "http://otel.observability:4317", "timeout": "3s",
                                  "headers": {"X-Scope": "team"}}}})));
        let tracing = &hcm(&b)["tracing"];
        assert_eq!(tracing["random_sampling"]["value"], 10.0);
        let provider = &tracing["provider"]["typed_config"];
        assert_eq!(provider["service_name"], "gw");
        let grpc = &provider["grpc_service"];
        assert_eq!(grpc["envoy_grpc"]["cluster_name"], COLLECTOR_CLUSTER);
        assert_eq!(grpc["timeout"], "3s");
        assert_eq!(
            grpc["initial_metadata"],
            json!([{"key": "x-scope", "value": "team"}])
        );
        assert!(provider.get("resource_detectors").is_none());
        let tags: Vec<(&str, &str)> = tracing["custom_tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["tag"].as_str().unwrap(), t["value"].as_str().unwrap()))
            .collect();
        assert_eq!(tags.len(), 1 + SPAN_ATTRIBUTES.len());
        assert!(tags.contains(&("jairouter.summary", "%FILTER_STATE(wasm.jairouter:PLAIN)%")));
        assert!(tags.contains(&(
            "gen_ai.request.model",
            "%FILTER_STATE(wasm.gen_ai.request.model:PLAIN)%"
        )));
        let cluster = collector(&b).unwrap();
        assert_eq!(cluster["type"], "STRICT_DNS");
        let http = &cluster["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"];
        assert!(http.get("http2_protocol_options").is_some());
        assert!(cluster.get("transport_socket").is_none());
    }

    #[test]
    fn http_protobuf_over_tls_with_resource_attributes() {
        let b = bootstrap(Some(json!({"enabled": true, "service-version": "1.2",
            "exporter": {"otlp": {"endpoint": "https://collector.example:4318",
                                  "protocol": "http/protobuf", "headers": {"authorization": "Basic x"}}}})));
        let provider = &hcm(&b)["tracing"]["provider"]["typed_config"];
        let http = &provider["http_service"];
        assert_eq!(
            http["http_uri"]["uri"],
            "https://collector.example:4318/v1/traces"
        );
        assert_eq!(
            http["request_headers_to_add"][0]["header"]["key"],
            "authorization"
        );
        assert!(provider.get("grpc_service").is_none());
        assert_eq!(
            provider["resource_detectors"][0]["typed_config"]["attributes"],
            json!({"service.version": "1.2"})
        );
        let cluster = collector(&b).unwrap();
        assert_eq!(
            cluster["transport_socket"]["typed_config"]["sni"],
            "collector.example"
        );
        let http = &cluster["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"];
        assert!(http.get("http_protocol_options").is_some());
    }
}
