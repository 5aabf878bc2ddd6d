//! Command line and environment: each flag `--x-y` may also come from `JAIROUTER_RATELIMIT_X_Y`;
//! the flag wins.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub redis_url: String,
    pub redis_timeout: Duration,
    pub key_prefix: String,
}

pub const USAGE: &str = "\
jairouter-ratelimit: global rate limits and token budgets for JAiRouter, backed by Redis

Usage: jairouter-ratelimit [OPTIONS]

Options (each also from the environment variable shown):
  --grpc-listen ADDR       gRPC (h2c) address  [JAIROUTER_RATELIMIT_GRPC_LISTEN, default 0.0.0.0:8081]
  --http-listen ADDR       /healthz, /metrics  [JAIROUTER_RATELIMIT_HTTP_LISTEN, default 0.0.0.0:8080]
  --redis-url URL          Redis to keep buckets in [JAIROUTER_RATELIMIT_REDIS_URL, default redis://127.0.0.1:6379/0]
  --redis-timeout-ms N     bound on every Redis call [JAIROUTER_RATELIMIT_REDIS_TIMEOUT_MS, default 50]
  --key-prefix P           prefix of every bucket key [JAIROUTER_RATELIMIT_KEY_PREFIX, default jrl]
  -h, --help               this text
  -V, --version            the version

Port 0 picks a free port; the line `LISTENING grpc=IP:PORT http=IP:PORT` on stdout tells which.
";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Config),
    Help,
    Version,
}

const FLAGS: [(&str, &str); 5] = [
    ("--grpc-listen", "JAIROUTER_RATELIMIT_GRPC_LISTEN"),
    ("--http-listen", "JAIROUTER_RATELIMIT_HTTP_LISTEN"),
    ("--redis-url", "JAIROUTER_RATELIMIT_REDIS_URL"),
    ("--redis-timeout-ms", "JAIROUTER_RATELIMIT_REDIS_TIMEOUT_MS"),
    ("--key-prefix", "JAIROUTER_RATELIMIT_KEY_PREFIX"),
];

const DEFAULTS: [&str; 5] = [
    "0.0.0.0:8081",
    "0.0.0.0:8080",
    "redis://127.0.0.1:6379/0",
    "50",
    "jrl",
];

/// Parse `args` (without the program name), looking variables up with `env`.
pub fn parse(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, String> {
    let mut given: [Option<String>; 5] = Default::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let i = FLAGS
            .iter()
            .position(|(f, _)| *f == flag)
            .ok_or_else(|| format!("unknown argument {arg:?} (see --help)"))?;
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        if let Some(slot) = given.get_mut(i) {
            *slot = Some(value);
        }
    }
    let mut values = Vec::with_capacity(5);
    for (i, ((flag, var), default)) in FLAGS.iter().zip(DEFAULTS).enumerate() {
        let from_flag = given.get_mut(i).and_then(Option::take);
        let (value, source) = match from_flag {
            Some(v) => (v, *flag),
            None => match env(var).filter(|v| !v.is_empty()) {
                Some(v) => (v, *var),
                None => (default.to_string(), *flag),
            },
        };
        values.push((value, source));
    }
    let mut values = values.into_iter();
    let mut next = || values.next().unwrap_or_default();

    let addr = |(v, source): (String, &str)| {
        v.parse::<SocketAddr>()
            .map_err(|e| format!("{source}: {v:?} is not an IP:PORT address ({e})"))
    };
    let grpc_listen = addr(next())?;
    let http_listen = addr(next())?;
    let (redis_url, source) = next();
    redis::parse_redis_url(&redis_url)
        .ok_or_else(|| format!("{source}: {redis_url:?} is not a redis:// URL"))?;
    let (ms, source) = next();
    let ms: u64 = ms
        .parse()
        .ok()
        .filter(|ms| (1..=60_000).contains(ms))
        .ok_or_else(|| format!("{source}: {ms:?} is not a number of milliseconds in 1..=60000"))?;
    let (key_prefix, source) = next();
    if key_prefix.is_empty() || key_prefix.contains(':') {
        return Err(format!(
            "{source}: the key prefix must be non-empty, without ':'"
        ));
    }
    Ok(Command::Run(Config {
        grpc_listen,
        http_listen,
        redis_url,
        redis_timeout: Duration::from_millis(ms),
        key_prefix,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match parse(args.iter().map(|s| s.to_string()), lookup)? {
            Command::Run(c) => Ok(c),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[], &[]);
        assert_eq!(
            c,
            Ok(Config {
                grpc_listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
                http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
                redis_url: "redis://127.0.0.1:6379/0".into(),
                redis_timeout: Duration::from_millis(50),
                key_prefix: "jrl".into(),
            })
        );
    }

    #[test]
    fn flags_win_over_env() {
        let c = run(
            &["--grpc-listen", "127.0.0.1:0", "--redis-timeout-ms=20"],
            &[
                ("JAIROUTER_RATELIMIT_GRPC_LISTEN", "127.0.0.1:9"),
                ("JAIROUTER_RATELIMIT_HTTP_LISTEN", "[::1]:0"),
                ("JAIROUTER_RATELIMIT_KEY_PREFIX", "x"),
            ],
        );
        let c = c.map(|c| {
            (
                c.grpc_listen.port(),
                c.http_listen.to_string(),
                c.redis_timeout,
                c.key_prefix,
            )
        });
        assert_eq!(
            c,
            Ok((0, "[::1]:0".into(), Duration::from_millis(20), "x".into()))
        );
    }

    #[test]
    fn bad_values() {
        assert!(run(&["--grpc-listen", "nope"], &[]).is_err());
        assert!(run(&["--redis-timeout-ms", "0"], &[]).is_err());
        assert!(run(&["--redis-url", "http://x"], &[]).is_err());
        assert!(run(&["--key-prefix", "a:b"], &[]).is_err());
        assert!(run(&["--bogus"], &[]).is_err());
        assert!(run(&["--key-prefix"], &[]).is_err());
        assert!(run(&[], &[("JAIROUTER_RATELIMIT_REDIS_TIMEOUT_MS", "x")]).is_err());
    }
}
