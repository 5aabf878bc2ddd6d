//! A small reader over `serde_json::Value` that tracks where it is, so that every refusal names
//! the key (`model.services.chat.instances[0].weight: ...`) and every unknown key is caught.
//!
//! Field names are accepted in both spellings Spring's relaxed binding allows (`base-url` and
//! `baseUrl`): a JAiRouter `application.yml` mixes them.

use serde_json::{Map, Value};
use std::fmt;

/// A refused configuration: the dotted path of the key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// A refusal at `path`. Refusals are the cold path of every reader: kept out of line.
pub fn error(path: &str, reason: impl Into<String>) -> ConfigError {
    refusal(path, reason.into())
}

#[cold]
#[inline(never)]
fn refusal(path: &str, reason: String) -> ConfigError {
    ConfigError {
        path: path.to_string(),
        reason,
    }
}

/// `baseUrl` → `base-url`; kebab-case names pass through unchanged.
pub fn kebab(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if !out.is_empty() {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' {
            out.push('-');
        } else {
            out.push(c);
        }
    }
    out
}

/// The fields of one JSON object, taken one by one; whatever is left at `finish` is unknown.
pub struct Fields<'a> {
    path: String,
    fields: Vec<(String, &'a str, &'a Value)>,
}

impl<'a> Fields<'a> {
    pub fn new(path: &str, value: &'a Value) -> Result<Self> {
        let map: &Map<String, Value> = value
            .as_object()
            .ok_or_else(|| error(path, format!("must be a mapping (got {})", kind(value))))?;
        let mut fields: Vec<(String, &'a str, &'a Value)> = Vec::with_capacity(map.len());
        for (key, value) in map {
            let normal = kebab(key);
            if fields.iter().any(|(seen, _, _)| *seen == normal) {
                return Err(error(
                    &join(path, key),
                    "given twice (in kebab-case and camelCase)",
                ));
            }
            fields.push((normal, key.as_str(), value));
        }
        Ok(Fields {
            path: path.to_string(),
            fields,
        })
    }

    /// The path of a child key, for messages and nested readers.
    pub fn child(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Removes and returns the field (a JSON `null` counts as absent, as YAML `key:` means unset).
    pub fn take(&mut self, key: &str) -> Option<&'a Value> {
        let at = self.fields.iter().position(|(name, _, _)| name == key)?;
        let (_, _, value) = self.fields.swap_remove(at);
        if value.is_null() {
            None
        } else {
            Some(value)
        }
    }

    pub fn string(&mut self, key: &str) -> Result<Option<&'a str>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(error(
                &self.child(key),
                format!("must be a string (got {})", kind(other)),
            )),
        }
    }

    pub fn boolean(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            // YAML writers sometimes quote booleans; Spring accepts "true"/"false".
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Some(other) => Err(error(
                &self.child(key),
                format!("must be true or false (got {})", kind(other)),
            )),
        }
    }

    /// A whole number within `min..=max`.
    pub fn integer(&mut self, key: &str, default: u64, min: u64, max: u64) -> Result<u64> {
        let path = self.child(key);
        let Some(value) = self.take(key) else {
            return Ok(default);
        };
        let number = match value {
            Value::Number(n) => n.as_u64(),
            // Spring binds "100" to a long as well.
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match number {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(error(
                &path,
                format!(
                    "must be a whole number from {min} to {max} (got {})",
                    show(value)
                ),
            )),
        }
    }

    /// Fails on the first field nobody took.
    pub fn finish(self) -> Result<()> {
        match self.fields.first() {
            None => Ok(()),
            Some((_, original, _)) => Err(error(&join(&self.path, original), "unknown key")),
        }
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A value shortened for an error message.
pub fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn kebab_accepts_both_spellings() {
        assert_eq!(kebab("baseUrl"), "base-url");
        assert_eq!(kebab("base-url"), "base-url");
        assert_eq!(kebab("failureThreshold"), "failure-threshold");
        assert_eq!(kebab("client_ip_enable"), "client-ip-enable");
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let v = json!({"weight": 1, "weigth": 2});
        let mut f = Fields::new("model.services.chat.instances[0]", &v).unwrap();
        assert_eq!(f.integer("weight", 1, 0, 10).unwrap(), 1);
        let err = f.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "model.services.chat.instances[0].weigth: unknown key"
        );
    }

    #[test]
    fn both_spellings_of_one_key_are_refused() {
        let v = json!({"base-url": "a", "baseUrl": "b"});
        assert!(Fields::new("x", &v).is_err());
    }

    #[test]
    fn integer_bounds_and_strings() {
        let v = json!({"a": -1, "b": "7", "c": 2.5, "d": 11});
        let mut f = Fields::new("p", &v).unwrap();
        assert!(f
            .integer("a", 0, 0, 10)
            .unwrap_err()
            .reason
            .contains("got -1"));
        assert_eq!(f.integer("b", 0, 0, 10).unwrap(), 7);
        assert!(f.integer("c", 0, 0, 10).is_err());
        assert!(f.integer("d", 0, 0, 10).is_err());
        assert_eq!(f.integer("e", 3, 0, 10).unwrap(), 3);
    }

    #[test]
    fn null_counts_as_absent() {
        let v = json!({"a": null});
        let mut f = Fields::new("p", &v).unwrap();
        assert_eq!(f.string("a").unwrap(), None);
        f.finish().unwrap();
    }
}
