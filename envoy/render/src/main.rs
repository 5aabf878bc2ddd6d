//! `jairouter-render`: the gateway's configuration tool.
//!
//!   Every command that reads FILE also takes --api-keys KEYS: a second file holding only
//!   `jairouter.security.api-key` (the Kubernetes Secret), for keys kept out of the ConfigMap.
//!
//!   jairouter-render check FILE
//!       Validates a JAiRouter application.yml with the filter's own code; exit 1 with a message
//!       naming the key when it is refused.
//!   jairouter-render plugin-config FILE
//!       Prints the filter's JSON configuration (for Istio, Envoy Gateway or a hand-written bootstrap).
//!   jairouter-render bootstrap FILE --wasm PATH [--port N] [--admin-port N]
//!       [--listen-address A] [--admin-address A] [--ca-file PATH] [--access-log PATH]
//!       [--status-port N|none] [--metrics-port N] [--live-dir DIR] [--out FILE]
//!       Renders a complete Envoy bootstrap. The port defaults to server.port, then 8080; the
//!       status page (GET /status) listens on the admin address, port 9902 by default; with
//!       --metrics-port, probes (GET /ready) and metrics (GET /stats/prometheus) listen on the
//!       listen address (for Kubernetes; the admin stays private). With
//!       --live-dir the filter's configuration and the clusters are files in DIR that Envoy
//!       watches (written now, and by `watch`).
//!   jairouter-render watch FILE --wasm PATH --live-dir DIR [--interval-ms N] [--settle-ms N]
//!       Follows FILE (and KEYS) and applies every change to a running gateway through DIR, in an order
//!       that drops no request; a refused change leaves the last good configuration serving.
//!   jairouter-render istio FILE --wasm-url URL [--wasm-sha256 HEX] [--namespace NS]
//!       [--mode gateway|sidecar] [--gateway NS/NAME] [--selector KEY=VALUE ...] [--host H ...]
//!       [--proxy-namespace NS] [--install envoyfilter|wasmplugin]
//!   jairouter-render envoy-gateway FILE --wasm-url URL [--wasm-sha256 HEX] [--namespace NS]
//!       --gateway [NS/]NAME [--host H ...] [--xds-listener NAME]
//!       Print the mesh's resources (multi-document YAML) that run the filter inside an Istio
//!       gateway or sidecar, or inside Envoy Gateway, and route its choice to each instance
//!       (see `mesh` and k8s/istio/README.md, k8s/envoy-gateway/README.md).
//!   jairouter-render hash-key [--salt BASE64] < KEY
//!       Reads one API key from stdin (a trailing newline is dropped) and prints its `key-hash`
//!       for `jairouter.security.api-key.keys`: Base64(salt):Base64(SHA-256(salt+key)), the
//!       original's format, with a random 16-byte salt unless --salt is given. A request costs one
//!       SHA-256 per distinct salt, so many keys may share one salt (--salt).

mod app_config;
mod bootstrap;
mod live;
mod mesh;

use jairouter_filter::plan::Plan;
use std::collections::HashMap;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("jairouter-render: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let (command, rest) = args.split_first().ok_or(USAGE)?;
    if command == "watch" {
        return watch_command(rest);
    }
    if command == "hash-key" {
        return hash_key_command(rest);
    }
    if command == "istio" || command == "envoy-gateway" {
        return mesh::command(args);
    }
    let (file, flags) = rest.split_first().ok_or(USAGE)?;
    let flags = parse_flags(flags)?;
    let app = app_config::load_files(file, flags.get("api-keys").map(String::as_str))?;
    let filter_config = app.filter_config();
    let router = Plan::from_value(&filter_config).map_err(|e| format!("{file}: {e}"))?;
    match command.as_str() {
        "check" => {
            let instances = router.instances().count();
            let models: usize = router.services().map(|s| s.models.len()).sum();
            println!("{file}: valid ({models} models, {instances} instances)");
            Ok(())
        }
        "plugin-config" => {
            println!("{filter_config}");
            Ok(())
        }
        "bootstrap" => {
            let get = |name: &str| flags.get(name).cloned();
            let opts = options(&flags, app.server_port)?;
            if opts.live_dir.is_some() {
                live::Live::open(opts.live_dir.as_deref().unwrap_or("."))?.publish_initial(
                    &router,
                    &filter_config,
                    &opts,
                )?;
            }
            let rendered = bootstrap::render(&router, &filter_config, &opts);
            let text = serde_json::to_string_pretty(&rendered).map_err(|e| e.to_string())?;
            match get("out") {
                Some(out) => std::fs::write(&out, text + "\n").map_err(|e| format!("{out}: {e}")),
                None => {
                    println!("{text}");
                    Ok(())
                }
            }
        }
        _ => Err(USAGE.to_string()),
    }
}

const USAGE: &str = "usage: jairouter-render (check|plugin-config|bootstrap) FILE [--api-keys KEYS] [--wasm PATH] \
[--port N] [--admin-port N] [--listen-address A] [--admin-address A] [--ca-file PATH] \
[--access-log PATH] [--status-port N|none] [--metrics-port N] [--live-dir DIR] [--out FILE]\n       \
jairouter-render watch FILE [--api-keys KEYS] --wasm PATH --live-dir DIR [--interval-ms N] [--settle-ms N]\n       \
jairouter-render istio FILE --wasm-url URL [--namespace NS] [--mode gateway|sidecar] [--gateway NS/NAME] \
[--selector KEY=VALUE ...] [--host H ...] [--proxy-namespace NS] [--install envoyfilter|wasmplugin] [--wasm-sha256 HEX]\n       \
jairouter-render envoy-gateway FILE --wasm-url URL --gateway [NS/]NAME [--namespace NS] [--host H ...] \
[--xds-listener NAME] [--wasm-sha256 HEX]\n       \
jairouter-render hash-key [--salt BASE64] < KEY";

/// The bootstrap's settings from the command line (`server_port`: the file's `server.port`).
fn options(
    flags: &HashMap<String, String>,
    server_port: Option<u16>,
) -> Result<bootstrap::Options, String> {
    let get = |name: &str| flags.get(name).cloned();
    let port_flag = |name: &str, default: u16| -> Result<u16, String> {
        match get(name) {
            None => Ok(default),
            Some(p) => p.parse().map_err(|_| format!("--{name}: not a port ({p})")),
        }
    };
    let wasm = get("wasm").ok_or("--wasm PATH is required")?;
    let wasm_path = std::fs::canonicalize(&wasm)
        .map_err(|e| format!("--wasm {wasm}: {e}"))?
        .to_string_lossy()
        .into_owned();
    let live_dir = match get("live-dir") {
        None => None,
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("--live-dir {dir}: {e}"))?;
            Some(
                std::fs::canonicalize(&dir)
                    .map_err(|e| format!("--live-dir {dir}: {e}"))?
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    };
    Ok(bootstrap::Options {
        listen_address: get("listen-address").unwrap_or_else(|| "0.0.0.0".into()),
        port: port_flag("port", server_port.unwrap_or(8080))?,
        admin_address: get("admin-address").unwrap_or_else(|| "127.0.0.1".into()),
        admin_port: port_flag("admin-port", 9901)?,
        wasm_path,
        ca_file: get("ca-file").unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into()),
        access_log: get("access-log").unwrap_or_else(|| "/dev/stdout".into()),
        status_port: match get("status-port").as_deref() {
            Some("none") => None,
            _ => Some(port_flag("status-port", 9902)?),
        },
        metrics_port: match get("metrics-port") {
            None => None,
            Some(_) => Some(port_flag("metrics-port", 0)?),
        },
        live_dir,
    })
}

/// `watch FILE --wasm PATH --live-dir DIR [--interval-ms N] [--settle-ms N]`
fn watch_command(rest: &[String]) -> Result<(), String> {
    let (file, flags) = rest.split_first().ok_or(USAGE)?;
    let flags = parse_flags(flags)?;
    if !flags.contains_key("live-dir") {
        return Err(
            "watch needs --live-dir DIR (the directory the bootstrap's Envoy watches)".into(),
        );
    }
    let millis = |name: &str, default: u64| -> Result<std::time::Duration, String> {
        let ms = match flags.get(name) {
            None => default,
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a number ({v})"))?,
        };
        Ok(std::time::Duration::from_millis(ms))
    };
    let opts = options(&flags, None)?;
    let keys_file = flags.get("api-keys").cloned();
    let mut files = vec![file.clone()];
    files.extend(keys_file.clone());
    let load = |file: &str| -> Result<live::Loaded, String> {
        let model = app_config::load_files(file, keys_file.as_deref())?.filter_config();
        let router = Plan::from_value(&model).map_err(|e| e.to_string());
        Ok(live::Loaded { model, router })
    };
    live::watch(
        &files,
        &opts,
        millis("interval-ms", 1000)?,
        millis("settle-ms", 1000)?,
        load,
    )
}

fn parse_flags(flags: &[String]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut it = flags.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag}\n{USAGE}"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        out.insert(name.to_string(), value.clone());
    }
    Ok(out)
}

/// `hash-key [--salt BASE64]`: the `key-hash` of the key on stdin.
fn hash_key_command(rest: &[String]) -> Result<(), String> {
    let flags = parse_flags(rest)?;
    if let Some(unknown) = flags.keys().find(|name| name.as_str() != "salt") {
        return Err(format!("hash-key: unknown flag --{unknown}\n{USAGE}"));
    }
    let salt = match flags.get("salt") {
        Some(text) => jairouter_filter::encoding::base64_decode(text.trim())
            .ok_or_else(|| format!("--salt: not Base64 ({text})"))?,
        None => random_salt()?,
    };
    let input =
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read stdin: {e}"))?;
    println!("{}", key_hash(&input, &salt)?);
    Ok(())
}

/// The `key-hash` line for `input` (one key, as read from stdin).
fn key_hash(input: &str, salt: &[u8]) -> Result<String, String> {
    use jairouter_filter::auth::hash_key;
    use jairouter_filter::config::MIN_SALT_BYTES;
    let key = input.strip_suffix('\n').unwrap_or(input);
    let key = key.strip_suffix('\r').unwrap_or(key);
    if key.is_empty() {
        return Err("hash-key: no key on stdin".into());
    }
    if key.chars().any(char::is_control) {
        return Err("hash-key: the key holds a control character or several lines".into());
    }
    if key.trim() != key {
        return Err(
            "hash-key: the key starts or ends with a space, which a header cannot carry".into(),
        );
    }
    if salt.len() < MIN_SALT_BYTES {
        return Err(format!(
            "--salt: {} bytes, at least {MIN_SALT_BYTES} needed",
            salt.len()
        ));
    }
    Ok(hash_key(salt, key))
}

fn random_salt() -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut salt = vec![0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(salt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jairouter_filter::auth::{presented_key, ApiKeys};
    use jairouter_filter::encoding::base64_decode;

    fn authenticates(line: &str, key: &str) -> bool {
        let section = serde_json::json!({
            "keys": [{"key-id": "ops", "key-hash": line, "permissions": "chat"}]
        });
        let keys = ApiKeys::parse("jairouter.security.api-key", &section).unwrap();
        let bearer = format!("Bearer {key}");
        keys.authenticate(presented_key(Some(&bearer), None), None, 0)
            .is_ok_and(|k| k.id == "ops")
    }

    #[test]
    fn hash_key_output_is_accepted_by_the_filter() {
        let salt = random_salt().unwrap();
        assert_eq!(salt.len(), 16);
        let line = key_hash("sk-live-0123456789\n", &salt).unwrap();
        assert!(authenticates(&line, "sk-live-0123456789"));
        assert!(!authenticates(&line, "sk-live-012345678"));
        let (salt_part, _) = line.split_once(':').unwrap();
        assert_eq!(base64_decode(salt_part).unwrap(), salt);

        // --salt: the same line every time, from the given salt.
        let given = key_hash("sk-x\r\n", b"0123456789abcdef").unwrap();
        assert_eq!(given, key_hash("sk-x", b"0123456789abcdef").unwrap());
        assert!(given.starts_with("MDEyMzQ1Njc4OWFiY2RlZg==:"));
        assert!(authenticates(&given, "sk-x"));
    }

    #[test]
    fn hash_key_refuses_what_no_request_could_present() {
        let salt = [1u8; 16];
        assert!(key_hash("", &salt).is_err());
        assert!(key_hash("\n", &salt).is_err());
        assert!(key_hash("sk-1\nsk-2\n", &salt).is_err());
        assert!(key_hash(" sk-1\n", &salt).is_err());
        assert!(key_hash("sk-1", &[1u8; 4]).is_err());
    }
}
