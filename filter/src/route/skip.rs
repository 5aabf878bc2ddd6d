//! Passing over an instance its breaker is open for, its health checker has down, or whose
//! backend asked for a pause (a 429 with Retry-After), whatever the strategy picked; and why,
//! for the reply when every instance is passed over.

use super::RouteInputs;
use crate::breaker::{self, Admission, Outcome};
use crate::plan::Instance;

/// Why the instances passed over were passed over.
#[derive(Debug, Default)]
pub(super) struct PassedOver {
    /// The soonest an open breaker passed over lets a trial through (an upper bound).
    pub open_for_ns: Option<u64>,
    /// Whether the health checker has one of them down.
    pub unhealthy: bool,
    /// The soonest a backend that answered 429 with Retry-After takes requests again.
    pub cooling_until: Option<u64>,
}

impl PassedOver {
    /// Whether the instance is passed over for its admission, noting why.
    pub fn passes_over(&mut self, instance: &Instance, admission: Option<Admission>) -> bool {
        match admission {
            Some(Admission::Refused) => {
                let timeout = instance.breaker.as_ref().map_or(0, |p| p.timeout_ns);
                self.open_for_ns = Some(self.open_for_ns.map_or(timeout, |t| t.min(timeout)));
            }
            Some(Admission::Unhealthy) => self.unhealthy = true,
            Some(Admission::CoolingDown { until_ns }) => {
                self.cooling_until = Some(self.cooling_until.map_or(until_ns, |t| t.min(until_ns)));
            }
            _ => return false,
        }
        true
    }
}

/// How the instance's health and breaker let a request through: one shared-data read, when it
/// has either (`None`: it has neither).
pub(super) fn admission(host: &RouteInputs<'_>, instance: &Instance) -> Option<Admission> {
    (instance.breaker.is_some() || instance.spec.health_check.is_some()).then(|| {
        breaker::admit(
            host.store,
            &instance.state_key,
            instance.breaker.as_ref(),
            host.now_ns(),
        )
    })
}

/// A breaker admission that will not be used (a half-open trial must free its place).
pub(super) fn release_breaker(
    host: &RouteInputs<'_>,
    instance: &Instance,
    admission: Option<Admission>,
) {
    if let (Some(policy), Some(admission)) = (&instance.breaker, admission) {
        breaker::record(
            host.store,
            &instance.state_key,
            policy,
            admission,
            Outcome::Neutral,
            host.now_ns(),
        );
    }
}
