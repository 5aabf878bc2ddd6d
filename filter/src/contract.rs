//! Names the filter, Envoy's bootstrap (rendered by `jairouter-render`), the mesh manifests and
//! the test harness must agree on. Each is defined here once; the renderer imports them, so a
//! rename cannot leave a bootstrap pointing at a header or a root id the filter no longer uses.

/// The header that names the Envoy cluster chosen by the filter; the bootstrap's route reads it
/// (`cluster_header`). A client-supplied value is always removed.
pub const ROUTING_HEADER: &str = "x-jairouter-cluster";
/// The header ORIGINAL_DST clusters honour: removed from every client request too.
pub const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";
/// A client may name the model in this header instead of the body (required for nothing; it saves
/// the body scan, e.g. for large uploads).
pub const MODEL_HEADER: &str = "x-jairouter-model";
/// Response header naming the instance that served.
pub const INSTANCE_HEADER: &str = "x-jairouter-instance";
/// The cluster of the rate-limit service the filter asks for limits across replicas
/// (`gateway.global-rate-limit`; the renderer adds it, HTTP/2).
pub const RATE_LIMIT_CLUSTER: &str = "jairouter-ratelimit";
/// Where Envoy's jwt_authn puts a verified token's payload in the request's metadata
/// (`payload_in_metadata`), for the filter to read its claims.
pub const JWT_PAYLOAD_KEY: &str = "jwt_payload";

/// The VM id every JAiRouter plugin of a process shares (so they share data).
pub const VM_ID: &str = "jairouter";
/// The routing filter's root id.
pub const ROUTER_ROOT_ID: &str = "jairouter";
/// The process's health checker (a singleton WasmService beside the HTTP filter).
pub const HEALTH_ROOT_ID: &str = "jairouter-health";
/// The status page's filter (on the admin-side listener).
pub const STATUS_ROOT_ID: &str = "jairouter-status";

/// The filter state the filter writes its access-log summary to; Envoy's access log reads it
/// as `%FILTER_STATE(wasm.jairouter:PLAIN)%` (proxy-wasm prefixes `wasm.`).
pub const LOG_SUMMARY_PROPERTY: &str = "jairouter";
pub const LOG_SUMMARY_FILTER_STATE: &str = "wasm.jairouter";

/// With tracing on (`jairouter.tracing`), what the filter knows of a request goes on its span:
/// each attribute is a filter state of its own (`wasm.<name>`), written once when the request's
/// story is known, and the bootstrap's tracing custom tags read it into the span under the same
/// name (`%FILTER_STATE(wasm.<name>:PLAIN)%`). Names follow OpenTelemetry's GenAI conventions
/// where they have one.
pub const SPAN_SERVICE: &str = "jairouter.service";
pub const SPAN_INSTANCE: &str = "jairouter.instance";
/// The model the client asked for.
pub const SPAN_REQUEST_MODEL: &str = "gen_ai.request.model";
/// The model that answered, when a fallback stood in for the one asked for.
pub const SPAN_RESPONSE_MODEL: &str = "gen_ai.response.model";
pub const SPAN_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const SPAN_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub const SPAN_ATTRIBUTES: [&str; 6] = [
    SPAN_SERVICE,
    SPAN_INSTANCE,
    SPAN_REQUEST_MODEL,
    SPAN_RESPONSE_MODEL,
    SPAN_INPUT_TOKENS,
    SPAN_OUTPUT_TOKENS,
];
/// The span attribute that carries the access log's summary (read from its filter state: it
/// costs the filter nothing more).
pub const SPAN_SUMMARY: &str = "jairouter.summary";

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_access_log_reads_what_the_filter_writes() {
        assert_eq!(
            LOG_SUMMARY_FILTER_STATE,
            format!("wasm.{LOG_SUMMARY_PROPERTY}")
        );
    }
}
