//! `jairouter-render`: the gateway's configuration tool.
//!
//!   jairouter-render check FILE
//!       Validates a JAiRouter application.yml with the filter's own code; exit 1 with a message
//!       naming the key when it is refused.
//!   jairouter-render plugin-config FILE
//!       Prints the filter's JSON configuration (for Istio, Envoy Gateway or a hand-written bootstrap).
//!   jairouter-render bootstrap FILE --wasm PATH [--port N] [--admin-port N]
//!       [--listen-address A] [--admin-address A] [--ca-file PATH] [--access-log PATH]
//!       [--out FILE]
//!       Renders a complete Envoy bootstrap. The port defaults to server.port, then 8080.

mod app_config;
mod bootstrap;

use jairouter_filter::config::RouterConfig;
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
    let (file, flags) = rest.split_first().ok_or(USAGE)?;
    let flags = parse_flags(flags)?;
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let env: HashMap<String, String> = std::env::vars().collect();
    let app = app_config::load(&text, &env).map_err(|e| format!("{file}: {e}"))?;
    let router = RouterConfig::from_value(&app.model).map_err(|e| format!("{file}: {e}"))?;
    match command.as_str() {
        "check" => {
            let instances = router.instances().count();
            let models: usize = router.services().map(|s| s.models.len()).sum();
            println!("{file}: valid ({models} models, {instances} instances)");
            Ok(())
        }
        "plugin-config" => {
            println!("{}", app.model);
            Ok(())
        }
        "bootstrap" => {
            let get = |name: &str| flags.get(name).cloned();
            let port_flag = |name: &str, default: u16| -> Result<u16, String> {
                match get(name) {
                    None => Ok(default),
                    Some(p) => p.parse().map_err(|_| format!("--{name}: not a port ({p})")),
                }
            };
            let wasm = get("wasm").ok_or("bootstrap needs --wasm PATH")?;
            let wasm_path = std::fs::canonicalize(&wasm)
                .map_err(|e| format!("--wasm {wasm}: {e}"))?
                .to_string_lossy()
                .into_owned();
            let opts = bootstrap::Options {
                listen_address: get("listen-address").unwrap_or_else(|| "0.0.0.0".into()),
                port: port_flag("port", app.server_port.unwrap_or(8080))?,
                admin_address: get("admin-address").unwrap_or_else(|| "127.0.0.1".into()),
                admin_port: port_flag("admin-port", 9901)?,
                wasm_path,
                ca_file: get("ca-file")
                    .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into()),
                access_log: get("access-log").unwrap_or_else(|| "/dev/stdout".into()),
            };
            let rendered = bootstrap::render(&router, &app.model, &opts);
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

const USAGE: &str = "usage: jairouter-render (check|plugin-config|bootstrap) FILE [--wasm PATH] \
[--port N] [--admin-port N] [--listen-address A] [--admin-address A] [--ca-file PATH] \
[--access-log PATH] [--out FILE]";

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
