//! The pick: the instance the service's strategy prefers (`balance::pick_instance`), then the
//! rest of the model's pool in turn from there, for when the first is passed over or refuses.
//!
//! A new picker (the inference-aware one: queue depth, KV cache, prefix affinity) goes here, as
//! another way to order the candidates: what follows (`skip`, the instance's limits, the
//! replies) is the same for every picker.

use super::RouteInputs;
use crate::balance::{pick_instance, Pool};

/// The instances to try, by index in their service: the one the strategy prefers, then the
/// rest of the pool's routable ones in turn from there, each once (none when none is routable).
pub(super) fn candidates<'p>(
    pool: &'p Pool,
    host: &RouteInputs<'_>,
    hash_key: Option<&str>,
) -> impl Iterator<Item = &'p usize> + 'p {
    let first = pick_instance(pool, host.store, host.rotations, &host.pick_input(hash_key));
    let start = first
        .and_then(|first| pool.routable.iter().position(|i| *i == first))
        .unwrap_or(0);
    let count = first.map_or(0, |_| pool.routable.len());
    pool.routable.iter().cycle().skip(start).take(count)
}
