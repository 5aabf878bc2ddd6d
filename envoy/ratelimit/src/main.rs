use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use jairouter_ratelimit::admin::{self, Admin};
use jairouter_ratelimit::config::{self, Command, Config};
use jairouter_ratelimit::metrics::Metrics;
use jairouter_ratelimit::service::Service;
use jairouter_ratelimit::store::Store;
use jairouter_ratelimit::{grpc, log};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long in-flight calls may take to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    log::init_from_env();
    let config = match config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("jairouter-ratelimit {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("jairouter-ratelimit: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jairouter-ratelimit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error(format_args!("{e}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let store = Store::new(&config.redis_url, config.redis_timeout, metrics.clone())?;
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (grpc): {e}", config.grpc_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (http): {e}", config.http_listen))?;
    let grpc_addr = grpc_listener.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http_listener.local_addr().map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "LISTENING grpc={grpc_addr} http={http_addr}");
        let _ = out.flush();
    }
    log::info(format_args!(
        "jairouter-ratelimit {} grpc={grpc_addr} http={http_addr} redis={} timeout={}ms prefix={}",
        env!("CARGO_PKG_VERSION"),
        redacted(&config.redis_url),
        config.redis_timeout.as_millis(),
        config.key_prefix
    ));
    store.spawn_connect();

    let (stop_tx, stop_rx) = watch::channel(false);
    let service = Arc::new(Service {
        store: store.clone(),
        metrics: metrics.clone(),
        key_prefix: config.key_prefix.clone(),
    });
    let grpc_task = tokio::spawn(grpc::serve(grpc_listener, service, stop_rx.clone()));
    let admin = Arc::new(Admin { store, metrics });
    let http_task = tokio::spawn(admin::serve(http_listener, admin, stop_rx));

    shutdown_signal().await?;
    log::info(format_args!("stopping: finishing in-flight calls"));
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN, grpc_task).await.is_err() {
        log::warn(format_args!(
            "calls still in flight after {DRAIN:?}; exiting"
        ));
    }
    let _ = http_task.await;
    log::info(format_args!("stopped"));
    Ok(())
}

/// The URL without its password, for the log.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!(
            "{}://***@{}",
            url.get(..s).unwrap_or(""),
            url.get(at + 1..).unwrap_or("")
        ),
        _ => url.to_string(),
    }
}

async fn shutdown_signal() -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
