//! The pick: the instance the service's strategy prefers (`balance::pick_instance`), then the
//! rest of the model's pool in turn from there, for when the first is passed over or refuses.
//!
//! A new picker (the inference-aware one: queue depth, KV cache, prefix affinity) goes here, as
//! another way to choose `first`: what follows it (`skip`, the instance's limits, the replies)
//! is the same for every picker.

use super::RouteInputs;
use crate::balance::{pick_instance, Pool};

/// The instance the strategy prefers, by index in its service (`None`: none is routable).
pub(super) fn first(pool: &Pool, host: &RouteInputs<'_>, hash_key: Option<&str>) -> Option<usize> {
    pick_instance(pool, host.store, host.rotations, &host.pick_input(hash_key))
}

/// The pool's routable instances from `first` on, each once, wrapping around.
pub(super) fn in_turn(pool: &Pool, first: usize) -> impl Iterator<Item = usize> + '_ {
    let start = pool.routable.iter().position(|i| *i == first).unwrap_or(0);
    pool.routable
        .iter()
        .cycle()
        .skip(start)
        .take(pool.routable.len())
        .copied()
}
