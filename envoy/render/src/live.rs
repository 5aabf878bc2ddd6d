//! Live configuration for the standalone gateway: Envoy watches two files in the live
//! directory, the filter's configuration (file-based ECDS) and the instances' clusters
//! (file-based CDS). `watch` rewrites them when the operator's application.yml changes.
//!
//! A change is applied in an order that drops no request: first the clusters of both the old
//! and the new configuration (new instances become reachable), then the filter's configuration
//! (traffic moves), then the clusters of the new configuration alone (removed instances go,
//! once nothing routes to them). A configuration the filter refuses is still handed to Envoy
//! (without its clusters): Envoy rejects it, logs the filter's reason, counts it
//! (`extension_config_discovery.jairouter.config_fail`), and keeps serving the last good one, the
//! same path a configuration pushed by Istio or Envoy Gateway takes.

use crate::bootstrap::{self, Options, LIVE_CLUSTERS, LIVE_FILTER};
use jairouter_filter::plan::Plan;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Live {
    dir: PathBuf,
    /// The clusters in the live file now, by name.
    clusters: Vec<Value>,
}

impl Live {
    /// Opens the live directory, reading the clusters Envoy was last given (if any).
    pub fn open(dir: &str) -> Result<Live, String> {
        let dir = PathBuf::from(dir);
        for file in [LIVE_FILTER, LIVE_CLUSTERS] {
            if let Some(parent) = dir.join(file).parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
        }
        let clusters = std::fs::read_to_string(dir.join(LIVE_CLUSTERS))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v.get("resources").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .into_iter()
            .map(|mut c| {
                if let Some(map) = c.as_object_mut() {
                    map.remove("@type");
                }
                c
            })
            .collect();
        Ok(Live { dir, clusters })
    }

    /// Writes both files at once: for a gateway that is not serving yet.
    pub fn publish_initial(
        &mut self,
        router: &Plan,
        model: &Value,
        opts: &Options,
    ) -> Result<(), String> {
        let clusters = sorted(bootstrap::instance_clusters(router, opts));
        self.write_clusters(clusters)?;
        self.write_filter(model, opts)
    }

    /// Moves a serving gateway to a new configuration without dropping a request.
    pub fn apply(
        &mut self,
        router: &Plan,
        model: &Value,
        opts: &Options,
        settle: Duration,
    ) -> Result<(), String> {
        let wanted = sorted(bootstrap::instance_clusters(router, opts));
        let mut union = wanted.clone();
        for old in &self.clusters {
            if !union.iter().any(|c| c.get("name") == old.get("name")) {
                union.push(old.clone());
            }
        }
        let union = sorted(union);
        if union != self.clusters {
            self.write_clusters(union)?;
            std::thread::sleep(settle);
        }
        self.write_filter(model, opts)?;
        if wanted != self.clusters {
            std::thread::sleep(settle);
            self.write_clusters(wanted)?;
        }
        Ok(())
    }

    /// Hands Envoy a configuration the filter will refuse (see the module comment).
    pub fn offer_refused(&mut self, model: &Value, opts: &Options) -> Result<(), String> {
        self.write_filter(model, opts)
    }

    fn write_clusters(&mut self, clusters: Vec<Value>) -> Result<(), String> {
        write_atomic(
            &self.dir.join(LIVE_CLUSTERS),
            &bootstrap::clusters_resource(&clusters),
        )?;
        self.clusters = clusters;
        Ok(())
    }

    /// Unchanged content is not rewritten: Envoy would load the same configuration again.
    fn write_filter(&self, model: &Value, opts: &Options) -> Result<(), String> {
        let path = self.dir.join(LIVE_FILTER);
        let resource = bootstrap::filter_resource(model, &opts.wasm_path);
        let current = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok());
        if current.as_ref() == Some(&resource) {
            return Ok(());
        }
        write_atomic(&path, &resource)
    }
}

/// Follows `files` (the configuration, then the API keys when separate) for ever: every change that parses is applied (or offered and refused, see
/// the module comment); each outcome is one line on stdout. Settings that only a restart can
/// change (listener, route, gateway options) are reported when they differ from the running ones.
pub fn watch(
    files: &[String],
    opts: &Options,
    interval: Duration,
    settle: Duration,
    load: impl Fn(&str) -> Result<Loaded, String>,
) -> Result<(), String> {
    let mut live = Live::open(opts.live_dir.as_deref().unwrap_or("."))?;
    let mut last_text: Option<String> = None;
    let mut running_bootstrap: Option<Value> = None;
    let file = files.first().map(String::as_str).unwrap_or_default();
    loop {
        // Every file (the configuration and the API keys' Secret) read whole: any change counts.
        let text: Option<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).ok())
            .collect::<Option<Vec<_>>>()
            .map(|texts| texts.join("\u{0}"));
        if text.is_some() && text != last_text {
            last_text = text;
            match load(file) {
                Err(e) => println!("jairouter-render: refused, nothing changed: {e}"),
                Ok(Loaded {
                    model,
                    router: Err(e),
                }) => {
                    println!("jairouter-render: {file}: refused: {e}; offered to Envoy, which keeps the last good configuration");
                    live.offer_refused(&model, opts)?;
                }
                Ok(Loaded {
                    model,
                    router: Ok(router),
                }) => {
                    let version =
                        jairouter_filter::status::config_version(model.to_string().as_bytes());
                    live.apply(&router, &model, opts, settle)?;
                    let bootstrap = bootstrap::render(&router, &model, opts);
                    match &running_bootstrap {
                        None => running_bootstrap = Some(bootstrap),
                        Some(running) if *running != bootstrap => println!(
                            "jairouter-render: {file}: some changed settings (gateway, retries, tracing, \
                             request-timeout) take effect only when Envoy restarts"
                        ),
                        Some(_) => {}
                    }
                    let instances = router.instances().count();
                    println!("jairouter-render: {file}: applied configuration {version} ({instances} instances)");
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// A configuration file as read: the filter's JSON, and the filter's verdict on it.
pub struct Loaded {
    pub model: Value,
    pub router: Result<Plan, String>,
}

fn sorted(mut clusters: Vec<Value>) -> Vec<Value> {
    clusters.sort_by(|a, b| {
        let name = |v: &Value| {
            v.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        name(a).cmp(&name(b))
    });
    clusters
}

/// Envoy reacts to a file moved into a watched directory: write beside it, then rename.
fn write_atomic(path: &Path, value: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())? + "\n";
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&temp, text).map_err(|e| format!("{}: {e}", temp.display()))?;
    std::fs::rename(&temp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(dir: &str) -> Options {
        Options {
            listen_address: "127.0.0.1".into(),
            port: 0,
            admin_address: "127.0.0.1".into(),
            admin_port: 0,
            wasm_path: "/x.wasm".into(),
            ca_file: "/ca.pem".into(),
            access_log: "none".into(),
            status_port: None,
            metrics_port: None,
            live_dir: Some(dir.into()),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(dir.join(LIVE_CLUSTERS)).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_change_keeps_old_clusters_until_the_filter_moved() {
        let dir = std::env::temp_dir().join(format!("jairouter-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.to_string_lossy().into_owned();
        let model = |ids: &[&str]| {
            let instances: Vec<Value> = ids
                .iter()
                .map(|id| json!({"name": "m", "base-url": "http://127.0.0.1:1", "instance-id": id}))
                .collect();
            json!({"services": {"chat": {"instances": instances}}})
        };
        let mut live = Live::open(&d).unwrap();
        let first = model(&["a", "b"]);
        live.publish_initial(&Plan::from_value(&first).unwrap(), &first, &opts(&d))
            .unwrap();
        assert_eq!(names(&dir), ["jairouter-a", "jairouter-b"]);

        // Reopened (a restarted watcher) it knows what Envoy has.
        let mut live = Live::open(&d).unwrap();
        let second = model(&["b", "c"]);
        live.apply(
            &Plan::from_value(&second).unwrap(),
            &second,
            &opts(&d),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(names(&dir), ["jairouter-b", "jairouter-c"]);
        let filter = std::fs::read_to_string(dir.join(LIVE_FILTER)).unwrap();
        assert!(filter.contains(r#"\"instance-id\":\"c\""#), "{filter}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
