//! The two methods: requests in, buckets out to the store, answers back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::grpc::{status, Call, Handler, Status};
use crate::metrics::{Method, Metrics, Outcome};
use crate::proto::{
    self, code, CurrentLimit, DescriptorStatus, Message, RateLimitRequest, RateLimitResponse,
    SettleRequest, SettleResponse,
};
use crate::store::{bucket_key, Charge, Store, StoreError, Take};

pub const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
pub const SETTLE: &str = "/jairouter.ratelimit.v1.TokenBudgets/Settle";
pub const MAX_DESCRIPTORS: usize = 64;
pub const MAX_SETTLEMENTS: usize = 1024;

pub struct Service {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub key_prefix: String,
}

impl Handler for Service {
    fn knows(&self, path: &str) -> bool {
        path == SHOULD_RATE_LIMIT || path == SETTLE
    }

    async fn call(&self, call: Call) -> Result<Vec<u8>, Status> {
        let start = Instant::now();
        let (method, result) = if call.path == SETTLE {
            let r = self.settle(&call).await;
            (Method::Settle, r.map(|resp| (resp.encode(), Outcome::Ok)))
        } else {
            let r = self.should_rate_limit(&call).await;
            let r = r.map(|resp| {
                let outcome = if resp.overall_code == code::OVER_LIMIT {
                    Outcome::OverLimit
                } else {
                    Outcome::Ok
                };
                (resp.encode(), outcome)
            });
            (Method::ShouldRateLimit, r)
        };
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(s) if s.code == status::INVALID_ARGUMENT || s.code == status::UNIMPLEMENTED => {
                Outcome::Invalid
            }
            Err(_) => Outcome::Error,
        };
        self.metrics.call(method, outcome, start.elapsed());
        result.map(|(bytes, _)| bytes)
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid(e.to_string())
}

fn unavailable(e: StoreError) -> Status {
    match e {
        StoreError::Timeout { deadline: true } => {
            Status::new(status::DEADLINE_EXCEEDED, e.to_string())
        }
        e => Status::new(status::UNAVAILABLE, e.to_string()),
    }
}

/// The unit's length in µs, or INVALID_ARGUMENT.
fn unit_us(unit: i32) -> Result<u64, Status> {
    proto::unit::seconds(unit)
        .map(|s| s * 1_000_000)
        .ok_or_else(|| {
            invalid(format!(
                "limit unit {unit} is not SECOND, MINUTE, HOUR or DAY"
            ))
        })
}

impl Service {
    /// How long Redis may take for this call: the Redis timeout, or what is left of the
    /// caller's deadline when that is sooner (then `true`).
    fn wait(&self, deadline: Option<Instant>) -> Result<(Duration, bool), Status> {
        let timeout = self.store.timeout();
        let Some(deadline) = deadline else {
            return Ok((timeout, false));
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Status::new(status::DEADLINE_EXCEEDED, "deadline reached"));
        }
        Ok(if left < timeout {
            (left, true)
        } else {
            (timeout, false)
        })
    }

    async fn should_rate_limit(&self, call: &Call) -> Result<RateLimitResponse, Status> {
        let message = call.message.as_ref().map_err(Clone::clone)?;
        let req = RateLimitRequest::decode(message).map_err(invalid)?;
        if req.domain.is_empty() {
            return Err(invalid("domain must not be empty"));
        }
        if req.descriptors.len() > MAX_DESCRIPTORS {
            return Err(invalid(format!(
                "{} descriptors, at most {MAX_DESCRIPTORS} are accepted",
                req.descriptors.len()
            )));
        }
        let default_hits = if req.hits_addend == 0 {
            1
        } else {
            u64::from(req.hits_addend)
        };
        let mut takes = Vec::with_capacity(req.descriptors.len());
        // For each descriptor, the index of its take (None: no limit, not limited).
        let mut slots = Vec::with_capacity(req.descriptors.len());
        for d in &req.descriptors {
            match &d.limit {
                None => slots.push(None),
                Some(limit) => {
                    slots.push(Some(takes.len()));
                    takes.push(Take {
                        key: bucket_key(&self.key_prefix, &req.domain, &d.entries),
                        capacity: limit.requests_per_unit,
                        unit_us: unit_us(limit.unit)?,
                        hits: d.hits_addend.unwrap_or(default_hits),
                    });
                }
            }
        }
        let outcomes = if takes.is_empty() {
            Vec::new()
        } else {
            let (wait, deadline) = self.wait(call.deadline)?;
            self.store
                .should_rate_limit(&takes, wait, deadline)
                .await
                .map_err(unavailable)?
        };
        let mut over = false;
        let statuses = req
            .descriptors
            .iter()
            .zip(slots)
            .map(|(d, slot)| {
                let (Some(limit), Some(o)) = (d.limit, slot.and_then(|i| outcomes.get(i))) else {
                    return DescriptorStatus {
                        code: code::OK,
                        ..Default::default()
                    };
                };
                over |= o.over;
                DescriptorStatus {
                    code: if o.over { code::OVER_LIMIT } else { code::OK },
                    current_limit: Some(CurrentLimit {
                        requests_per_unit: limit.requests_per_unit,
                        unit: limit.unit,
                        name: String::new(),
                    }),
                    limit_remaining: o.remaining,
                    duration_until_reset: Some(proto::Duration::from_micros(o.wait_us)),
                }
            })
            .collect();
        Ok(RateLimitResponse {
            overall_code: if over { code::OVER_LIMIT } else { code::OK },
            statuses,
        })
    }

    async fn settle(&self, call: &Call) -> Result<SettleResponse, Status> {
        let message = call.message.as_ref().map_err(Clone::clone)?;
        let req = SettleRequest::decode(message).map_err(invalid)?;
        if req.domain.is_empty() {
            return Err(invalid("domain must not be empty"));
        }
        if req.settlements.len() > MAX_SETTLEMENTS {
            return Err(invalid(format!(
                "{} settlements, at most {MAX_SETTLEMENTS} are accepted",
                req.settlements.len()
            )));
        }
        // A settlement without a (valid) limit cannot be applied: it is skipped, not counted.
        let charges: Vec<Charge> = req
            .settlements
            .iter()
            .filter_map(|s| {
                let limit = s.descriptor.limit?;
                Some(Charge {
                    key: bucket_key(&self.key_prefix, &req.domain, &s.descriptor.entries),
                    capacity: limit.requests_per_unit,
                    unit_us: unit_us(limit.unit).ok()?,
                    delta: s.delta,
                })
            })
            .collect();
        if charges.is_empty() {
            return Ok(SettleResponse { applied: 0 });
        }
        let (wait, deadline) = self.wait(call.deadline)?;
        let applied = self
            .store
            .settle(&charges, wait, deadline)
            .await
            .map_err(unavailable)?;
        Ok(SettleResponse { applied })
    }
}
