//! Reading a JAiRouter `application.yml`: its `model:` section (or a file that is just that
//! section), its API keys (`jairouter.security.api-key`, possibly from a second file: the
//! Kubernetes Secret), its tracing (`jairouter.tracing`), `server.port`, and Spring's
//! `${VAR:default}` placeholders.

use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug)]
pub struct AppConfig {
    /// The `model:` section as JSON.
    pub model: Value,
    /// `jairouter.security.api-key`, when the file has it.
    pub api_keys: Option<Value>,
    /// `server.port`, when the file gives one.
    pub server_port: Option<u16>,
    /// `jairouter.tracing`, when the file has it (the filter reads it: see `filter_config`).
    pub tracing: Option<Value>,
}

impl AppConfig {
    /// What the filter is configured with: the `model:` section alone, or beside the API keys
    /// and the tracing section under the original's names when there are any.
    pub fn filter_config(&self) -> Value {
        if self.api_keys.is_none() && self.tracing.is_none() {
            return self.model.clone();
        }
        let mut jairouter = serde_json::Map::new();
        if let Some(keys) = &self.api_keys {
            jairouter.insert("security".into(), serde_json::json!({"api-key": keys}));
        }
        if let Some(tracing) = &self.tracing {
            jairouter.insert("tracing".into(), tracing.clone());
        }
        serde_json::json!({"model": self.model, "jairouter": jairouter})
    }

    /// Takes the API keys from a second file (`--api-keys`), which holds only them.
    pub fn add_api_keys(
        &mut self,
        text: &str,
        env: &HashMap<String, String>,
    ) -> Result<(), String> {
        let mut found = None;
        for document in serde_yaml::Deserializer::from_str(text) {
            let value: Value = serde::Deserialize::deserialize(document)
                .map_err(|e| format!("not valid YAML: {e}"))?;
            let value = resolve_placeholders(value, env)?;
            if found.is_none() {
                found = api_key_section(&value);
            }
        }
        let keys = found.ok_or("has no `jairouter.security.api-key:` section")?;
        if self.api_keys.is_some() {
            return Err("jairouter.security.api-key is given in both files; keep it in one".into());
        }
        self.api_keys = Some(keys);
        Ok(())
    }
}

fn api_key_section(value: &Value) -> Option<Value> {
    let security = value.get("jairouter")?.get("security")?;
    security
        .get("api-key")
        .or_else(|| security.get("apiKey"))
        .cloned()
}

/// Reads the configuration file and, when given, the API keys' file (errors name the file),
/// with placeholders filled from the process's environment.
pub fn load_files(file: &str, api_keys: Option<&str>) -> Result<AppConfig, String> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"));
    let mut app = load(&read(file)?, &env).map_err(|e| format!("{file}: {e}"))?;
    if let Some(keys_file) = api_keys {
        app.add_api_keys(&read(keys_file)?, &env)
            .map_err(|e| format!("{keys_file}: {e}"))?;
    }
    Ok(app)
}

pub fn load(text: &str, env: &HashMap<String, String>) -> Result<AppConfig, String> {
    let mut model: Option<Value> = None;
    let mut api_keys: Option<Value> = None;
    let mut server_port = None;
    let mut tracing: Option<Value> = None;
    // Spring files may hold several YAML documents; the first that has each part wins.
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(document)
            .map_err(|e| format!("configuration file is not valid YAML: {e}"))?;
        let value = resolve_placeholders(value, env)?;
        if server_port.is_none() {
            server_port = port_of(&value)?;
        }
        if api_keys.is_none() {
            api_keys = api_key_section(&value);
        }
        if tracing.is_none() {
            tracing = value
                .get("jairouter")
                .and_then(|j| j.get("tracing"))
                .filter(|t| !t.is_null())
                .cloned();
        }
        if model.is_none() {
            model = match value.get("model") {
                // The original keeps `adapter-definitions` at the top level; the filter reads
                // them beside the services.
                Some(m) => Some(with_adapter_definitions(m.clone(), &value)),
                // A file holding just the model: content.
                None if value.get("services").is_some() => Some(value),
                None => None,
            };
        }
    }
    let model = model.ok_or("configuration file has no `model:` section (and no `services:`)")?;
    Ok(AppConfig {
        model,
        api_keys,
        server_port,
        tracing,
    })
}

fn with_adapter_definitions(mut model: Value, document: &Value) -> Value {
    if let (Some(definitions), Some(map)) =
        (document.get("adapter-definitions"), model.as_object_mut())
    {
        map.entry("adapter-definitions")
            .or_insert_with(|| definitions.clone());
    }
    model
}

fn port_of(value: &Value) -> Result<Option<u16>, String> {
    match value.get("server").and_then(|s| s.get("port")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .map(Some)
            .ok_or_else(|| format!("server.port: not a port number ({n})")),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u16>()
            .map(Some)
            .map_err(|_| format!("server.port: not a port number ({s:?})")),
        Some(other) => Err(format!("server.port: not a port number ({other})")),
    }
}

/// Replaces Spring placeholders `${NAME}` and `${NAME:default}` in every string.
fn resolve_placeholders(value: Value, env: &HashMap<String, String>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(substitute(&s, env)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| resolve_placeholders(v, env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| Ok((k, resolve_placeholders(v, env)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other,
    })
}

fn substitute(text: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed placeholder in {text:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (env.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "placeholder ${{{name}}} is not set in the environment and has no default"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        HashMap::from([("TOKEN".to_string(), "s3cret".to_string())])
    }

    #[test]
    fn spring_file_and_placeholders() {
        let text = r#"
server:
  port: 9090
model:
  services:
    chat:
      instances:
        - name: "m"
          base-url: "http://h:${PORT_X:1234}"
          headers:
            Authorization: "Bearer ${TOKEN:}"
management:
  endpoints: {}
"#;
        let cfg = load(text, &env()).unwrap();
        assert_eq!(cfg.server_port, Some(9090));
        let i = &cfg.model["services"]["chat"]["instances"][0];
        assert_eq!(i["base-url"], "http://h:1234");
        assert_eq!(i["headers"]["Authorization"], "Bearer s3cret");
    }

    #[test]
    fn the_tracing_section_goes_to_the_filter_beside_the_model() {
        let text = "model:\n  services: {}\njairouter:\n  tracing:\n    enabled: true\n    \
                    service-name: ${SVC:gw}\n";
        let cfg = load(text, &env()).unwrap();
        let filter = cfg.filter_config();
        assert_eq!(filter["jairouter"]["tracing"]["service-name"], "gw");
        assert_eq!(filter["model"]["services"], serde_json::json!({}));
        assert!(filter["jairouter"].get("security").is_none());
        // Without it (nor API keys), the model section alone, as before.
        let cfg = load("model:\n  services: {}\njairouter: {}\n", &env()).unwrap();
        assert_eq!(cfg.filter_config(), serde_json::json!({"services": {}}));
    }

    #[test]
    fn bare_model_section() {
        let cfg = load("services:\n  chat:\n    instances: []\n", &env()).unwrap();
        assert!(cfg.model.get("services").is_some());
        assert_eq!(cfg.server_port, None);
    }

    #[test]
    fn errors() {
        assert!(load("server: {port: 8080}\n", &env())
            .unwrap_err()
            .contains("no `model:`"));
        assert!(load("model: {services: {}}\nserver: {port: 70000}\n", &env()).is_err());
        assert!(load("model: {x: \"${NOPE}\"}\n", &env())
            .unwrap_err()
            .contains("NOPE"));
        assert!(load(": : :\n  - [", &env()).is_err());
    }
}
