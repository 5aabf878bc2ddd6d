//! Buckets in Redis: the key of a descriptor, the two Lua scripts and the connection.
//!
//! A bucket is a hash `{t: tokens, ts: last refill}`: tokens in micro-units (×1,000,000,
//! integral, negative for a debt from Settle), the time in µs of Redis's clock (`TIME`).
//! Every call is one script, so it is atomic against every other replica and instance.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};
use tokio::sync::watch;

use crate::log;
use crate::metrics::Metrics;
use crate::proto::Entry;

/// The Redis key of the bucket of (domain, entries):
/// `<prefix>:<domain>:<number of entries>:<key>=<value>;<key>=<value>...`, the domain and
/// every key and value percent-escaped for `:`, `;`, `=` and `%`, so distinct descriptors
/// never share a key.
pub fn bucket_key(prefix: &str, domain: &str, entries: &[Entry]) -> String {
    let mut k = String::with_capacity(prefix.len() + domain.len() + 8 + entries.len() * 24);
    k.push_str(prefix);
    k.push(':');
    escape_into(&mut k, domain);
    k.push(':');
    k.push_str(&entries.len().to_string());
    k.push(':');
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            k.push(';');
        }
        escape_into(&mut k, &e.key);
        k.push('=');
        escape_into(&mut k, &e.value);
    }
    k
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            ';' => out.push_str("%3B"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
}

/// One bucket to check (and take from) in ShouldRateLimit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    pub key: String,
    /// N: the capacity, and the refill per unit.
    pub capacity: u32,
    pub unit_us: u64,
    pub hits: u64,
}

/// One settlement: `delta` whole units charged (> 0) or given back (< 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub key: String,
    pub capacity: u32,
    pub unit_us: u64,
    pub delta: i64,
}

/// The script's answer for one descriptor of ShouldRateLimit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub over: bool,
    /// Whole units left after the call (0 when over).
    pub remaining: u32,
    /// OK: µs until the bucket is full; over: µs until its hits fit.
    pub wait_us: u64,
}

/// The functions both scripts share: a bucket's state refilled to `now`.
const LOAD: &str = r#"
local M = 1000000
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * M + tonumber(clock[2])

-- The bucket `key` of capacity `cap` (micro-units) refilling `cap` per `per` µs, refilled to
-- now: tokens, and the time up to which refill has been credited.
local function load(key, cap, per)
  local v = redis.call('HMGET', key, 't', 'ts')
  local tokens, last = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or last == nil then return cap, now end
  if tokens > cap then tokens = cap end
  if tokens < -cap then tokens = -cap end
  if cap == 0 or now <= last then return tokens, now end
  local elapsed = now - last
  local gained = math.floor(elapsed * cap / per)
  if tokens + gained >= cap then return cap, now end
  -- Credit only the time the whole micro-units gained took, so slow refills are not lost.
  local used = math.ceil(gained * per / cap)
  if used > elapsed then used = elapsed end
  return tokens + gained, last + used
end

local function store(key, tokens, last, per)
  redis.call('HSET', key, 't', string.format('%.0f', tokens), 'ts', string.format('%.0f', last))
  redis.call('PEXPIRE', key, math.ceil(2 * per / 1000))
end
"#;

/// ShouldRateLimit: KEYS[i] a bucket, ARGV[3i-2], ARGV[3i-1], ARGV[3i] its capacity N, unit
/// in µs and hits. Takes from every bucket only when every bucket has its hits (a key named
/// twice needs the sum). Returns code (1 OK, 2 over), whole units remaining, µs to wait, per key.
const SHOULD_RATE_LIMIT: &str = r#"
local cap, per, tok, last, need = {}, {}, {}, {}, {}
for i = 1, #KEYS do
  local k = KEYS[i]
  if tok[k] == nil then
    cap[k] = tonumber(ARGV[3 * i - 2]) * M
    per[k] = tonumber(ARGV[3 * i - 1])
    tok[k], last[k] = load(k, cap[k], per[k])
    need[k] = 0
  end
  need[k] = need[k] + tonumber(ARGV[3 * i]) * M
end
local all = true
for i = 1, #KEYS do
  local k = KEYS[i]
  if need[k] > tok[k] then all = false end
end
local done = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  if not done[k] then
    done[k] = true
    if all then tok[k] = tok[k] - need[k] end
    store(k, tok[k], last[k], per[k])
  end
end
local out = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local c, p, t = cap[k], per[k], tok[k]
  if all or need[k] <= t then
    local wait = 0
    if c > 0 then wait = math.ceil((c - t) * p / c) end
    local left = 0
    if t > 0 then left = math.floor(t / M) end
    out[#out + 1] = 1
    out[#out + 1] = left
    out[#out + 1] = wait
  else
    local wait = p
    if c > 0 and need[k] <= c then wait = math.ceil((need[k] - t) * p / c) end
    out[#out + 1] = 2
    out[#out + 1] = 0
    out[#out + 1] = wait
  end
end
return out
"#;

/// Settle: KEYS[i] a bucket, ARGV[3i-2], ARGV[3i-1], ARGV[3i] its capacity N, unit in µs and
/// delta (whole units, > 0 charges). Refill, subtract, clamp to [-N, N]. Returns #KEYS.
const SETTLE: &str = r#"
local cap, per, tok, last = {}, {}, {}, {}
for i = 1, #KEYS do
  local k = KEYS[i]
  if tok[k] == nil then
    cap[k] = tonumber(ARGV[3 * i - 2]) * M
    per[k] = tonumber(ARGV[3 * i - 1])
    tok[k], last[k] = load(k, cap[k], per[k])
  end
  local t = tok[k] - tonumber(ARGV[3 * i]) * M
  if t > cap[k] then t = cap[k] end
  if t < -cap[k] then t = -cap[k] end
  tok[k] = t
end
local done = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  if not done[k] then
    done[k] = true
    store(k, tok[k], last[k], per[k])
  end
end
return #KEYS
"#;

/// Why a Redis call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Not answered within the wait (the Redis timeout, or the caller's deadline when sooner).
    Timeout { deadline: bool },
    /// No connection yet, or Redis answered with an error.
    Redis(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Timeout { deadline: true } => {
                write!(f, "deadline reached waiting for redis")
            }
            StoreError::Timeout { deadline: false } => write!(f, "redis did not answer in time"),
            StoreError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

pub struct Store {
    client: Client,
    /// None until the first connection; the manager reconnects by itself from then on.
    conn: watch::Sender<Option<ConnectionManager>>,
    /// Why the first connection has not been made yet.
    connect_error: std::sync::Mutex<String>,
    timeout: Duration,
    should_rate_limit: Script,
    settle: Script,
    health: AtomicU8,
    metrics: Arc<Metrics>,
}

impl Store {
    pub fn new(url: &str, timeout: Duration, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let client = Client::open(url).map_err(|e| format!("redis url {url:?}: {e}"))?;
        Ok(Arc::new(Store {
            client,
            conn: watch::Sender::new(None),
            connect_error: std::sync::Mutex::new("first connection still being made".into()),
            timeout,
            should_rate_limit: Script::new(&format!("{LOAD}{SHOULD_RATE_LIMIT}")),
            settle: Script::new(&format!("{LOAD}{SETTLE}")),
            health: AtomicU8::new(UNKNOWN),
            metrics,
        }))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Connect in the background until it works; the connection manager reconnects by
    /// itself from then on.
    pub fn spawn_connect(self: &Arc<Self>) {
        let store = self.clone();
        tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(store.timeout.max(Duration::from_millis(500)))
                .set_response_timeout(store.timeout.max(Duration::from_millis(500)))
                .set_number_of_retries(3)
                .set_factor(50)
                .set_max_delay(500);
            loop {
                match ConnectionManager::new_with_config(store.client.clone(), config.clone()).await
                {
                    Ok(conn) => {
                        store.conn.send_replace(Some(conn));
                        // The first call reports the health.
                        let _ = store.ping(store.timeout).await;
                        return;
                    }
                    Err(e) => {
                        if let Ok(mut last) = store.connect_error.lock() {
                            *last = e.to_string();
                        }
                        store.observe(&Err::<(), _>(StoreError::Redis(e.to_string())), true);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        });
    }

    pub fn is_up(&self) -> bool {
        self.health.load(Ordering::Relaxed) == UP
    }

    /// Record a call's outcome: count errors, and log the transitions down and up once each.
    fn observe<T>(&self, result: &Result<T, StoreError>, outage: bool) {
        let now = match result {
            Ok(_) => UP,
            Err(_) => {
                self.metrics.redis_error();
                if !outage {
                    return;
                }
                DOWN
            }
        };
        let before = self.health.swap(now, Ordering::Relaxed);
        match (before, now, result) {
            (UP, UP, _) | (DOWN, DOWN, _) => {}
            (_, UP, _) => log::info(format_args!("redis is up")),
            (_, _, Err(e)) => log::error(format_args!("redis is unavailable: {e}")),
            _ => {}
        }
    }

    async fn run<T, F, Fut>(&self, wait: Duration, deadline: bool, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let mut connected = self.conn.subscribe();
        let work = async {
            // Before the first connection, wait for it (within the same bound).
            let conn = connected
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|c| c.clone());
            match conn {
                Some(conn) => f(conn).await.map_err(Some),
                None => Err(None),
            }
        };
        let (result, outage) = match tokio::time::timeout(wait, work).await {
            Ok(Ok(v)) => (Ok(v), false),
            Ok(Err(Some(e))) => {
                let outage = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout();
                (Err(StoreError::Redis(e.to_string())), outage)
            }
            Ok(Err(None)) => (Err(StoreError::Redis("no connection".into())), true),
            Err(_) if self.conn.borrow().is_none() => {
                let why = self
                    .connect_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default();
                (
                    Err(StoreError::Redis(format!("not connected: {why}"))),
                    true,
                )
            }
            Err(_) => (Err(StoreError::Timeout { deadline }), !deadline),
        };
        self.observe(&result, outage);
        result
    }

    /// PING within `wait`.
    pub async fn ping(&self, wait: Duration) -> Result<(), StoreError> {
        self.run(wait, false, |mut conn| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(drop)
        })
        .await
    }

    /// Check every bucket of `takes` and take from all of them or none. `wait` caps the
    /// Redis wait below the Redis timeout (`deadline` says it comes from the caller).
    pub async fn should_rate_limit(
        &self,
        takes: &[Take],
        wait: Duration,
        deadline: bool,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut inv = self.should_rate_limit.prepare_invoke();
        for t in takes {
            // More than N can never fit; N + 1 keeps the script's numbers exact.
            let hits = t.hits.min(u64::from(t.capacity) + 1);
            inv.key(&t.key).arg(t.capacity).arg(t.unit_us).arg(hits);
        }
        let inv = &inv;
        let raw: Vec<i64> = self
            .run(wait, deadline, |mut conn| async move {
                inv.invoke_async(&mut conn).await
            })
            .await?;
        if raw.len() != takes.len() * 3 {
            return Err(StoreError::Redis(format!(
                "script answered {} values for {} buckets",
                raw.len(),
                takes.len()
            )));
        }
        Ok(raw
            .chunks_exact(3)
            .map(|c| match *c {
                [code, remaining, wait] => Outcome {
                    over: code != 1,
                    remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
                    wait_us: wait.max(0) as u64,
                },
                _ => Outcome {
                    over: true,
                    remaining: 0,
                    wait_us: 0,
                },
            })
            .collect())
    }

    /// Apply every charge atomically; returns how many were applied.
    pub async fn settle(
        &self,
        charges: &[Charge],
        wait: Duration,
        deadline: bool,
    ) -> Result<u32, StoreError> {
        let mut inv = self.settle.prepare_invoke();
        for c in charges {
            // Beyond ±2N the clamp to [-N, N] gives the same bucket; keeps the numbers exact.
            let bound = 2 * i64::from(c.capacity);
            inv.key(&c.key)
                .arg(c.capacity)
                .arg(c.unit_us)
                .arg(c.delta.clamp(-bound, bound));
        }
        let inv = &inv;
        let applied: i64 = self
            .run(wait, deadline, |mut conn| async move {
                inv.invoke_async(&mut conn).await
            })
            .await?;
        Ok(u32::try_from(applied.max(0)).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
        pairs
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect()
    }

    #[test]
    fn key_format() {
        let e = entries(&[
            ("limit", "model.services.chat.rate-limit"),
            ("bucket", "chat/gpt-4o"),
        ]);
        assert_eq!(
            bucket_key("jrl", "jairouter", &e),
            "jrl:jairouter:2:limit=model.services.chat.rate-limit;bucket=chat/gpt-4o"
        );
        assert_eq!(bucket_key("jrl", "d", &[]), "jrl:d:0:");
    }

    #[test]
    fn key_escaping() {
        let e = entries(&[("a:b", "c;d=e%f")]);
        assert_eq!(bucket_key("p", "x:y", &e), "p:x%3Ay:1:a%3Ab=c%3Bd%3De%25f");
    }

    #[test]
    fn keys_do_not_collide() {
        // Pairs that would share a key with naive joining.
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            ("d", entries(&[("a", "b;c=d")])),
            ("d", entries(&[("a", "b"), ("c", "d")])),
            ("d", entries(&[("a=b", "c")])),
            ("d", entries(&[("a", "b=c")])),
            ("d:1:a", entries(&[("b", "c")])),
            ("d", entries(&[("a", "%3B")])),
            ("d", entries(&[("a", ";")])),
            ("d", entries(&[])),
            ("d", entries(&[("", "")])),
        ];
        let keys: std::collections::HashSet<String> =
            cases.iter().map(|(d, e)| bucket_key("p", d, e)).collect();
        assert_eq!(keys.len(), cases.len());
    }
}
