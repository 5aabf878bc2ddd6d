//! `jairouter-render`: the gateway's configuration tool.
//!
//!   Every command that reads FILE also takes --api-keys KEYS: a second file holding only
//!   `jairouter.security.api-key` (the Kubernetes Secret), for keys kept out of the ConfigMap.
//!   A flag the command does not take, a flag without its value and a flag given twice (only
//!   --selector and --host repeat) are refused with exit status 2 (see `flags`).
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
//!   jairouter-render watch FILE --wasm PATH --live-dir DIR [--ca-file PATH] [--interval-ms N]
//!       [--settle-ms N]
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
//!   jairouter-render info FILE [--port N] port|model|global-rate-limit
//!       Answers one question about FILE for a script (`./build.sh up`), on one line: the API
//!       listener's port `bootstrap` renders with the same --port (else server.port, else
//!       8080); a model to try (the first of the first service, chat first); the address of
//!       gateway.global-rate-limit as HOST:PORT. Nothing is printed when FILE has none.
//!   jairouter-render hash-key [--salt BASE64] < KEY
//!       Reads one API key from stdin (a trailing newline is dropped) and prints its `key-hash`
//!       for `jairouter.security.api-key.keys`: Base64(salt):Base64(SHA-256(salt+key)), the
//!       original's format, with a random 16-byte salt unless --salt is given. A request costs one
//!       SHA-256 per distinct salt, so many keys may share one salt (--salt).

mod app_config;
mod bootstrap;
mod envoy_json;
mod flags;
mod info;
mod live;
mod mesh;
mod tracing;

use flags::{once, Args, Command, UsageError};
use jairouter_filter::plan::Plan;
use std::process::ExitCode;

const CHECK: Command = Command {
    name: "check",
    operands: &["FILE"],
    flags: &[once("api-keys")],
    usage: "FILE [--api-keys KEYS]",
};

const PLUGIN_CONFIG: Command = Command {
    name: "plugin-config",
    operands: &["FILE"],
    flags: &[once("api-keys")],
    usage: "FILE [--api-keys KEYS]",
};

const BOOTSTRAP: Command = Command {
    name: "bootstrap",
    operands: &["FILE"],
    flags: &[
        once("api-keys"),
        once("wasm"),
        once("port"),
        once("admin-port"),
        once("listen-address"),
        once("admin-address"),
        once("ca-file"),
        once("access-log"),
        once("status-port"),
        once("metrics-port"),
        once("live-dir"),
        once("out"),
    ],
    usage: "FILE [--api-keys KEYS] --wasm PATH [--port N] [--admin-port N] [--listen-address A] \
[--admin-address A] [--ca-file PATH] [--access-log PATH] [--status-port N|none] [--metrics-port N] \
[--live-dir DIR] [--out FILE]",
};

/// The watcher writes the filter's configuration (`--wasm`) and the clusters (`--ca-file` for
/// https backends) the way `bootstrap` did, so it takes those of bootstrap's flags.
const WATCH: Command = Command {
    name: "watch",
    operands: &["FILE"],
    flags: &[
        once("api-keys"),
        once("wasm"),
        once("live-dir"),
        once("ca-file"),
        once("interval-ms"),
        once("settle-ms"),
    ],
    usage: "FILE [--api-keys KEYS] --wasm PATH --live-dir DIR [--ca-file PATH] [--interval-ms N] \
[--settle-ms N]",
};

const HASH_KEY: Command = Command {
    name: "hash-key",
    operands: &[],
    flags: &[once("salt")],
    usage: "[--salt BASE64] < KEY",
};

/// Every command, in the order the usage lists them.
const COMMANDS: [&Command; 8] = [
    &CHECK,
    &PLUGIN_CONFIG,
    &BOOTSTRAP,
    &WATCH,
    &mesh::ISTIO,
    &mesh::ENVOY_GATEWAY,
    &info::COMMAND,
    &HASH_KEY,
];

fn usage() -> String {
    let lines: Vec<String> = COMMANDS.iter().map(|c| c.usage_line()).collect();
    lines.join("\n")
}

/// Why a run failed: a command line that does not fit (exit 2, as shells and getopt do), or
/// the work itself (exit 1: a refused configuration, an unreadable file).
enum Failure {
    Usage(String),
    Failed(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::Failed(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::Failed(message.to_string())
    }
}

impl From<UsageError> for Failure {
    fn from(error: UsageError) -> Failure {
        Failure::Usage(error.0)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("jairouter-render: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(message)) => {
            eprintln!("jairouter-render: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    let Some((name, rest)) = args.split_first() else {
        return Err(Failure::Usage(format!("no command\n{}", usage())));
    };
    if matches!(name.as_str(), "help" | "--help" | "-h") {
        println!("{}", usage());
        return Ok(());
    }
    let command = COMMANDS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Failure::Usage(format!("unknown command {name}\n{}", usage())))?;
    // Every command's line is checked before it does anything.
    let flags = command.parse(rest)?;
    match command.name {
        "watch" => return Ok(watch_command(&flags)?),
        "hash-key" => return Ok(hash_key_command(&flags)?),
        "info" => return info_command(&flags),
        "istio" | "envoy-gateway" => return Ok(mesh::command(command.name, &flags, args)?),
        _ => {}
    }
    let file = flags.operand(0);
    let (app, filter_config, router) = load(file, flags.one("api-keys"))?;
    match command.name {
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
        _ => {
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
            match flags.one("out") {
                Some(out) => {
                    Ok(std::fs::write(out, text + "\n").map_err(|e| format!("{out}: {e}"))?)
                }
                None => {
                    println!("{text}");
                    Ok(())
                }
            }
        }
    }
}

/// FILE (and KEYS): the configuration, the filter's configuration made of it, and its plan.
fn load(
    file: &str,
    api_keys: Option<&str>,
) -> Result<(app_config::AppConfig, serde_json::Value, Plan), String> {
    let app = app_config::load_files(file, api_keys)?;
    let filter_config = app.filter_config();
    let router = Plan::from_value(&filter_config).map_err(|e| format!("{file}: {e}"))?;
    Ok((app, filter_config, router))
}

/// `--name N`, else `default`.
fn port_flag(flags: &Args, name: &str, default: u16) -> Result<u16, String> {
    match flags.one(name) {
        None => Ok(default),
        Some(p) => p.parse().map_err(|_| format!("--{name}: not a port ({p})")),
    }
}

/// The API listener's port: `--port`, else the file's `server.port`, else 8080.
fn listen_port(flags: &Args, server_port: Option<u16>) -> Result<u16, String> {
    port_flag(flags, "port", server_port.unwrap_or(8080))
}

/// `info FILE [--port N] QUESTION`: the answer on one line, or nothing.
fn info_command(flags: &Args) -> Result<(), Failure> {
    let question = info::Question::parse(flags.operand(1))?;
    let (app, _, router) = load(flags.operand(0), flags.one("api-keys"))?;
    let port = listen_port(flags, app.server_port)?;
    if let Some(answer) = info::answer(question, &router, port) {
        println!("{answer}");
    }
    Ok(())
}

/// The bootstrap's settings from the command line (`server_port`: the file's `server.port`).
fn options(flags: &Args, server_port: Option<u16>) -> Result<bootstrap::Options, String> {
    let get = |name: &str| flags.one(name).map(str::to_string);
    let port_flag = |name: &str, default: u16| port_flag(flags, name, default);
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
        port: listen_port(flags, server_port)?,
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
fn watch_command(flags: &Args) -> Result<(), String> {
    let file = flags.operand(0);
    if flags.one("live-dir").is_none() {
        return Err(
            "watch needs --live-dir DIR (the directory the bootstrap's Envoy watches)".into(),
        );
    }
    let millis = |name: &str, default: u64| -> Result<std::time::Duration, String> {
        let ms = match flags.one(name) {
            None => default,
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a number ({v})"))?,
        };
        Ok(std::time::Duration::from_millis(ms))
    };
    let opts = options(flags, None)?;
    let keys_file = flags.one("api-keys").map(str::to_string);
    let mut files = vec![file.to_string()];
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

/// `hash-key [--salt BASE64]`: the `key-hash` of the key on stdin.
fn hash_key_command(flags: &Args) -> Result<(), String> {
    let salt = match flags.one("salt") {
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
