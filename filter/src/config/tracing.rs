//! `jairouter.tracing`, the original JAiRouter's tracing section, as written: spans through
//! Envoy's own OpenTelemetry tracer (rendered into the bootstrap by `jairouter-render`), exported
//! over OTLP to a collector. Off unless `enabled: true`.
//!
//! The original configured its Java SDK with the same section; the keys that meant something
//! for that SDK only (batch processors, thread pools, log formats, per-component capture flags,
//! attribute encryption) are accepted and have no effect. The keys that would change which
//! requests are traced in a way Envoy cannot (per-path, per-service and rule-based sampling)
//! are refused when they ask for anything.

use super::reader::{self, error, show, Fields, Result};
use super::{parse_headers, scalar_text, BaseUrl};
use serde_json::Value;

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`TraceService/Export`), the collector's port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`), the collector's port 4318.
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn name(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// The path of OTLP/HTTP trace exports when the endpoint gives none.
pub const OTLP_HTTP_PATH: &str = "/v1/traces";

/// `jairouter.tracing` when `enabled`.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingOptions {
    /// `service-name`: the spans' resource attribute `service.name`.
    pub service_name: String,
    /// Further resource attributes: `service-version`, `service-namespace` and
    /// `open-telemetry.resource.attributes`.
    pub resource: Vec<(String, String)>,
    /// `sampling.ratio` as a percentage (Envoy's `random_sampling`).
    pub sampling_percent: f64,
    /// `exporter.otlp`.
    pub exporter: OtlpExporter,
}

/// `exporter.otlp`: where and how the spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExporter {
    /// `endpoint`: the collector (its path is the OTLP/HTTP path).
    pub collector: BaseUrl,
    pub protocol: OtlpProtocol,
    /// `timeout` in ms: how long one export may take.
    pub timeout_ms: u64,
    /// `headers`: sent with every export (a collector's credentials).
    pub headers: Vec<(String, String)>,
}

impl TracingOptions {
    /// Reads the section at `path` (`jairouter.tracing`): `None` when tracing is off (then
    /// only `enabled` is read: the original's section may stay as it was, whatever it holds).
    pub fn parse(path: &str, value: &Value) -> Result<Option<TracingOptions>> {
        let mut f = Fields::new(path, value)?;
        if !f.boolean("enabled", false)? {
            return Ok(None);
        }
        let service_name = text(&mut f, "service-name")?.unwrap_or_else(|| "jairouter".into());
        let mut resource = Vec::new();
        for (key, attribute) in [
            ("service-version", "service.version"),
            ("service-namespace", "service.namespace"),
        ] {
            if let Some(value) = text(&mut f, key)? {
                resource.push((attribute.to_string(), value));
            }
        }
        if let Some(v) = f.take("open-telemetry") {
            open_telemetry(&f.child("open-telemetry"), v, &mut resource)?;
        }
        let sampling_percent = match f.take("sampling") {
            Some(v) => sampling(&f.child("sampling"), v)?,
            None => 100.0,
        };
        let exporter_path = f.child("exporter");
        let exporter = f.take("exporter");
        // The original SDK's own machinery: nothing here to set.
        for ignored in [
            "logging",
            "performance",
            "components",
            "security",
            "monitoring",
        ] {
            f.take(ignored);
        }
        f.finish()?;
        let Some(exporter) = exporter else {
            return Err(error(
                &reader::join(&exporter_path, "otlp.endpoint"),
                ENDPOINT_REQUIRED,
            ));
        };
        Ok(Some(TracingOptions {
            service_name,
            resource,
            sampling_percent,
            exporter: otlp_exporter(&exporter_path, exporter)?,
        }))
    }
}

/// A non-empty string (trimmed).
fn text(f: &mut Fields<'_>, key: &str) -> Result<Option<String>> {
    match f.string(key)?.map(str::trim) {
        None => Ok(None),
        Some("") => Err(error(&f.child(key), "must not be empty")),
        Some(s) if s.contains(['\r', '\n', '\0']) => {
            Err(error(&f.child(key), "must not contain line breaks"))
        }
        Some(s) => Ok(Some(s.to_string())),
    }
}

/// `open-telemetry`: the resource's attributes; the rest configured the original's SDK.
fn open_telemetry(path: &str, value: &Value, resource: &mut Vec<(String, String)>) -> Result<()> {
    let mut f = Fields::new(path, value)?;
    if !f.boolean("enabled", true)? {
        return Err(error(
            &f.child("enabled"),
            "false would leave no tracer: turn tracing off with jairouter.tracing.enabled: false",
        ));
    }
    if let Some(v) = f.take("resource") {
        let mut r = Fields::new(&f.child("resource"), v)?;
        if let Some(attributes) = r.take("attributes") {
            let apath = r.child("attributes");
            let map = attributes
                .as_object()
                .ok_or_else(|| error(&apath, "must be a mapping of attribute name to value"))?;
            for (name, v) in map {
                let vpath = reader::join(&apath, name);
                let value = scalar_text(&vpath, v)?;
                if name.trim().is_empty() {
                    return Err(error(&vpath, "an attribute needs a name"));
                }
                if name == "service.name" {
                    return Err(error(&vpath, "is set by jairouter.tracing.service-name"));
                }
                resource.retain(|(n, _)| n != name);
                resource.push((name.clone(), value));
            }
        }
        r.finish()?;
    }
    f.take("sdk");
    f.finish()
}

/// `sampling`: the share of requests traced, as a percentage.
fn sampling(path: &str, value: &Value) -> Result<f64> {
    let mut f = Fields::new(path, value)?;
    let ratio_path = f.child("ratio");
    let ratio = match f.take("ratio") {
        None => 1.0,
        Some(v) => {
            let number = match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match number {
                Some(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(error(
                        &ratio_path,
                        format!("must be a number from 0.0 to 1.0 (got {})", show(v)),
                    ))
                }
            }
        }
    };
    let per_request = "Envoy samples every request at sampling.ratio (a client's traceparent \
                       that declined sampling is honoured): remove it";
    for key in ["service-ratios", "always-sample", "never-sample", "rules"] {
        if f.take(key).is_some_and(|v| !is_empty(v)) {
            return Err(error(&f.child(key), per_request));
        }
    }
    if let Some(v) = f.take("adaptive") {
        let mut a = Fields::new(&f.child("adaptive"), v)?;
        if a.boolean("enabled", false)? {
            return Err(error(&a.child("enabled"), per_request));
        }
    }
    f.finish()?;
    Ok(ratio * 100.0)
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.is_empty(),
        Value::Object(map) => map.is_empty(),
        Value::Null => true,
        _ => false,
    }
}

/// Why tracing without a collector is refused.
const ENDPOINT_REQUIRED: &str =
    "is required with tracing enabled: the collector's OTLP endpoint, e.g. http://otel-collector:4317";

/// `exporter`: OTLP only (Envoy's OpenTelemetry tracer); the other exporters' blocks may stay.
fn otlp_exporter(path: &str, value: &Value) -> Result<OtlpExporter> {
    let mut f = Fields::new(path, value)?;
    match f.string("type")?.map(str::trim) {
        None | Some("otlp") => {}
        Some(other) => {
            return Err(error(
                &f.child("type"),
                format!(
                    "{other:?} is not exported here: Envoy's OpenTelemetry tracer speaks OTLP \
                     (type: otlp, and an OpenTelemetry Collector in front of {other} if need be)"
                ),
            ))
        }
    }
    for ignored in ["jaeger", "zipkin", "logging"] {
        f.take(ignored);
    }
    let otlp_path = f.child("otlp");
    let endpoint_path = reader::join(&otlp_path, "endpoint");
    let Some(otlp) = f.take("otlp") else {
        return Err(error(&endpoint_path, ENDPOINT_REQUIRED));
    };
    f.finish()?;
    parse_otlp(&otlp_path, &endpoint_path, otlp)
}

/// `exporter.otlp`.
fn parse_otlp(path: &str, endpoint_path: &str, value: &Value) -> Result<OtlpExporter> {
    let mut o = Fields::new(path, value)?;
    let protocol = match o.string("protocol")?.map(str::trim) {
        None | Some("grpc") => OtlpProtocol::Grpc,
        Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        Some(other) => {
            return Err(error(
                &o.child("protocol"),
                format!("must be grpc or http/protobuf (got {other:?})"),
            ))
        }
    };
    let Some(endpoint) = o.string("endpoint")?.map(str::trim) else {
        return Err(error(endpoint_path, ENDPOINT_REQUIRED));
    };
    let collector = collector_url(endpoint_path, endpoint, protocol)?;
    let timeout_ms = match o.take("timeout") {
        None => 10_000,
        Some(v) => duration_ms(&o.child("timeout"), v)?,
    };
    let headers = match o.take("headers") {
        None => Vec::new(),
        Some(v) => parse_headers(&o.child("headers"), v)?,
    };
    // Envoy sends its exports uncompressed: a collector takes them either way.
    match o.string("compression")?.map(str::trim) {
        None | Some("gzip" | "none") => {}
        Some(other) => {
            return Err(error(
                &o.child("compression"),
                format!("must be gzip or none (got {other:?})"),
            ))
        }
    }
    o.finish()?;
    Ok(OtlpExporter {
        collector,
        protocol,
        timeout_ms,
        headers,
    })
}

/// The collector's URL: without a path for OTLP/gRPC, with the traces path (by default
/// `OTLP_HTTP_PATH`) for OTLP/HTTP.
fn collector_url(endpoint_path: &str, endpoint: &str, protocol: OtlpProtocol) -> Result<BaseUrl> {
    let mut collector = BaseUrl::parse(endpoint_path, endpoint)?;
    match protocol {
        OtlpProtocol::Grpc if !collector.prefix.is_empty() => {
            return Err(error(
                endpoint_path,
                format!(
                    "OTLP/gRPC takes no path (got {endpoint:?}); for OTLP/HTTP set \
                     exporter.otlp.protocol: http/protobuf"
                ),
            ))
        }
        OtlpProtocol::HttpProtobuf if collector.prefix.is_empty() => {
            collector.prefix = OTLP_HTTP_PATH.to_string();
        }
        _ => {}
    }
    Ok(collector)
}

/// A Spring `Duration`: a number of ms, or a number with `ms`, `s` or `m`; from 1 ms to 1 min.
fn duration_ms(path: &str, value: &Value) -> Result<u64> {
    let ms = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
                Some(at) => s.split_at(at),
                None => (s, "ms"),
            };
            let scale = match unit.trim() {
                "ms" => Some(1),
                "s" => Some(1000),
                "m" => Some(60_000),
                _ => None,
            };
            number
                .parse::<u64>()
                .ok()
                .zip(scale)
                .and_then(|(n, scale)| n.checked_mul(scale))
        }
        _ => None,
    };
    match ms {
        Some(ms) if (1..=60_000).contains(&ms) => Ok(ms),
        _ => Err(error(
            path,
            format!(
                "must be a duration from 1ms to 60s, like 10s or 500ms (got {})",
                show(value)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn with_tracing(tracing: Value) -> std::result::Result<Option<TracingOptions>, String> {
        let config = json!({
            "model": {"services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}},
            "jairouter": {"tracing": tracing}
        });
        Config::from_value(&config)
            .map(|c| c.settings.tracing)
            .map_err(|e| e.to_string())
    }

    fn refused(tracing: Value) -> String {
        with_tracing(tracing).unwrap_err()
    }

    fn on(otlp: Value) -> Value {
        json!({"enabled": true, "exporter": {"type": "otlp", "otlp": otlp}})
    }

    #[test]
    fn off_unless_enabled_whatever_the_rest_says() {
        assert_eq!(with_tracing(json!({})), Ok(None));
        // The original's shipped section, exporter `logging` and per-path sampling included.
        let original = json!({
            "enabled": false, "service-name": "jairouter",
            "sampling": {"ratio": 0.1, "always-sample": ["/api/v1"], "never-sample": ["/health"]},
            "exporter": {"type": "logging"}
        });
        assert_eq!(with_tracing(original), Ok(None));
        assert_eq!(
            with_tracing(json!({"enabled": "false", "nonsense": 1})),
            Ok(None)
        );
        // The model section alone has no tracing.
        let bare = json!({"services": {}});
        assert!(Config::from_value(&bare)
            .unwrap()
            .settings
            .tracing
            .is_none());
    }

    #[test]
    fn grpc_by_default_with_the_original_s_keys() {
        let t = with_tracing(json!({
            "enabled": true,
            "service-name": "gateway-eu",
            "service-version": "2.1",
            "serviceNamespace": "prod",
            "open-telemetry": {"enabled": true, "resource": {"attributes": {"deployment.environment": "eu"}},
                               "sdk": {"trace": {"processors": {"batch": {"schedule-delay": "5s"}}}}},
            "sampling": {"ratio": 0.25, "service-ratios": {}, "always-sample": [], "rules": [],
                         "adaptive": {"enabled": false}},
            "exporter": {"type": "otlp", "otlp": {"endpoint": "http://otel:4317", "timeout": "2s",
                         "compression": "gzip", "headers": {"Authorization": "Bearer t"}},
                         "zipkin": {"endpoint": "http://z:9411"}},
            "performance": {"async-processing": true}, "components": {}, "security": {},
            "monitoring": {}, "logging": {}
        }))
        .unwrap()
        .unwrap();
        assert_eq!(t.service_name, "gateway-eu");
        assert_eq!(
            t.resource,
            vec![
                ("service.version".to_string(), "2.1".to_string()),
                ("service.namespace".to_string(), "prod".to_string()),
                ("deployment.environment".to_string(), "eu".to_string()),
            ]
        );
        assert_eq!(t.sampling_percent, 25.0);
        assert_eq!(t.exporter.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            (
                t.exporter.collector.host.as_str(),
                t.exporter.collector.port
            ),
            ("otel", 4317)
        );
        assert_eq!(t.exporter.timeout_ms, 2000);
        assert_eq!(
            t.exporter.headers,
            vec![("authorization".to_string(), "Bearer t".to_string())]
        );
    }

    #[test]
    fn defaults_and_http() {
        let t = with_tracing(json!({"enabled": true, "exporter": {"otlp": {
            "endpoint": "https://collector.example:4318", "protocol": "http/protobuf"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(t.service_name, "jairouter");
        assert!(t.resource.is_empty());
        assert_eq!(t.sampling_percent, 100.0);
        assert_eq!(t.exporter.protocol, OtlpProtocol::HttpProtobuf);
        assert!(t.exporter.collector.tls);
        assert_eq!(t.exporter.collector.prefix, OTLP_HTTP_PATH);
        assert_eq!(t.exporter.timeout_ms, 10_000);
        let t = with_tracing(on(json!({"endpoint": "http://c:4318/otlp/v1/traces",
                                        "protocol": "http/protobuf", "timeout": 250})))
        .unwrap()
        .unwrap();
        assert_eq!(t.exporter.collector.prefix, "/otlp/v1/traces");
        assert_eq!(t.exporter.timeout_ms, 250);
        let zero = with_tracing(json!({"enabled": true, "sampling": {"ratio": "0"},
                                       "exporter": {"otlp": {"endpoint": "http://c:4317"}}}));
        assert_eq!(zero.unwrap().unwrap().sampling_percent, 0.0);
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            (json!({"enabled": true}), "jairouter.tracing.exporter.otlp.endpoint: is required"),
            (json!({"enabled": true, "exporter": {"type": "otlp"}}),
             "jairouter.tracing.exporter.otlp.endpoint: is required"),
            (json!({"enabled": true, "exporter": {"type": "logging"}}),
             "jairouter.tracing.exporter.type: \"logging\" is not exported here"),
            (on(json!({"endpoint": "otel:4317"})),
             "jairouter.tracing.exporter.otlp.endpoint: must start with http:// or https://"),
            (on(json!({"endpoint": "http://localhost:4318/v1/traces"})),
             "jairouter.tracing.exporter.otlp.endpoint: OTLP/gRPC takes no path"),
            (on(json!({"endpoint": "http://c:4317", "protocol": "http/json"})),
             "jairouter.tracing.exporter.otlp.protocol: must be grpc or http/protobuf"),
            (on(json!({"endpoint": "http://c:4317", "timeout": "10 days"})),
             "jairouter.tracing.exporter.otlp.timeout: must be a duration"),
            (on(json!({"endpoint": "http://c:4317", "timeout": "0s"})),
             "jairouter.tracing.exporter.otlp.timeout: must be a duration"),
            (on(json!({"endpoint": "http://c:4317", "compression": "zstd"})),
             "jairouter.tracing.exporter.otlp.compression: must be gzip or none"),
            (on(json!({"endpoint": "http://c:4317", "headers": {"bad name": "x"}})),
             "jairouter.tracing.exporter.otlp.headers.bad name: is not a valid header name"),
            (on(json!({"endpoint": "http://c:4317", "insecure": true})),
             "jairouter.tracing.exporter.otlp.insecure: unknown key"),
            (json!({"enabled": true, "sampling": {"ratio": 1.5}}),
             "jairouter.tracing.sampling.ratio: must be a number from 0.0 to 1.0 (got 1.5)"),
            (json!({"enabled": true, "sampling": {"ratio": "most"}}),
             "jairouter.tracing.sampling.ratio: must be a number from 0.0 to 1.0"),
            (json!({"enabled": true, "sampling": {"never-sample": ["/health"]}}),
             "jairouter.tracing.sampling.never-sample: Envoy samples every request at sampling.ratio"),
            (json!({"enabled": true, "sampling": {"adaptive": {"enabled": true}}}),
             "jairouter.tracing.sampling.adaptive.enabled: Envoy samples"),
            (json!({"enabled": true, "service-name": " "}),
             "jairouter.tracing.service-name: must not be empty"),
            (json!({"enabled": true, "open-telemetry": {"enabled": false}}),
             "jairouter.tracing.open-telemetry.enabled: false would leave no tracer"),
            (json!({"enabled": true, "open-telemetry": {"resource": {"attributes": {"service.name": "x"}}}}),
             "jairouter.tracing.open-telemetry.resource.attributes.service.name: is set by"),
            (json!({"enabled": true, "open-telemetry": {"resource": {"attributes": {"k": [1]}}}}),
             "jairouter.tracing.open-telemetry.resource.attributes.k: must be a string"),
            (json!({"enabled": true, "sample-rate": 1}), "jairouter.tracing.sample-rate: unknown key"),
            (json!({"enabled": 1}), "jairouter.tracing.enabled: must be true or false"),
            (json!("on"), "jairouter.tracing: must be a mapping"),
        ];
        for (tracing, expected) in cases {
            let message = refused(tracing.clone());
            assert!(message.starts_with(expected), "{tracing}: {message}");
        }
    }
}
