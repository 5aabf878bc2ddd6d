//! The host's shared data, behind a trait: Envoy's `get_shared_data`/`set_shared_data` in the
//! filter, a map in tests. Every Envoy worker of one process sees the same keys, and a set with
//! the CAS value from a get fails if another worker wrote in between, which makes counters exact.

use crate::bytes::u64_le;
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer changed the key since it was read.
    CasMismatch,
    /// The host refused for another reason.
    Failed,
}

pub trait SharedStore {
    /// The value and its CAS token; `(None, _)` when the key does not exist.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes the value if `cas` still matches (a `None` cas writes unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// Contention seen in Envoy stays below a few retries; the bound only keeps a pathological
/// host from spinning the worker.
const MAX_CAS_ATTEMPTS: usize = 64;

/// Creates a zero counter unless one exists. Envoy ignores CAS on a key that does not exist yet,
/// so counters must be created before traffic can race on them (at configure time).
pub fn ensure_counter(store: &dyn SharedStore, key: &str) {
    // Empty: a reload stopped using it and emptied it (shared data has no delete).
    if store.get(key).0.is_none_or(|v| v.is_empty()) {
        let _ = store.set(key, &0u64.to_le_bytes(), None);
    }
}

/// Reads the key, lets `step` decide what to write (or nothing) and what to answer, and writes
/// with compare-and-swap, retrying on a lost race; `None` when the host refused or contention
/// never let up.
pub fn transact<T>(
    store: &dyn SharedStore,
    key: &str,
    step: impl Fn(Option<&[u8]>) -> (Option<Vec<u8>>, T),
) -> Option<T> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (value, cas) = store.get(key);
        let (written, answer) = step(value.as_deref());
        let Some(written) = written else {
            return Some(answer);
        };
        match store.set(key, &written, cas) {
            Ok(()) => return Some(answer),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Failed) => return None,
        }
    }
    None
}

/// Replaces the value with `next(current)` atomically; returns what it wrote.
pub fn update(
    store: &dyn SharedStore,
    key: &str,
    next: impl Fn(Option<&[u8]>) -> Vec<u8>,
) -> Option<Vec<u8>> {
    transact(store, key, |current| {
        let written = next(current);
        (Some(written.clone()), written)
    })
}

/// Atomically adds `delta` to a counter that never goes below zero; returns the new value.
pub fn add_saturating(store: &dyn SharedStore, key: &str, delta: i64) -> Option<u64> {
    let written = update(store, key, |v| {
        let current = v.map(decode_u64).unwrap_or(0);
        current.saturating_add_signed(delta).to_le_bytes().to_vec()
    })?;
    Some(decode_u64(&written))
}

/// A counter's value (zero when absent).
pub fn read_u64(store: &dyn SharedStore, key: &str) -> u64 {
    store.get(key).0.as_deref().map(decode_u64).unwrap_or(0)
}

/// A counter's value; a shorter value (never written by us) reads as if zero-padded.
pub fn decode_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    for (slot, byte) in raw.iter_mut().zip(bytes) {
        *slot = *byte;
    }
    u64_le(&raw, 0).unwrap_or(0)
}

/// An in-memory store with Envoy's CAS semantics, for tests and native tools.
#[derive(Default)]
pub struct MemoryStore {
    entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
}

impl MemoryStore {
    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.entries.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut entries = self.entries.borrow_mut();
        match entries.get_mut(key) {
            Some((stored, version)) => {
                if cas.is_some_and(|c| c != *version) {
                    return Err(StoreError::CasMismatch);
                }
                *stored = value.to_vec();
                *version = version.wrapping_add(1);
            }
            None => {
                entries.insert(key.to_string(), (value.to_vec(), 1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn increments_and_cas() {
        let store = MemoryStore::default();
        ensure_counter(&store, "k");
        assert_eq!(add_saturating(&store, "k", 1), Some(1));
        assert_eq!(add_saturating(&store, "k", 1), Some(2));
        let (_, cas) = store.get("k");
        store.set("k", &5u64.to_le_bytes(), None).unwrap();
        assert_eq!(
            store.set("k", &6u64.to_le_bytes(), cas),
            Err(StoreError::CasMismatch)
        );
        ensure_counter(&store, "k"); // does not reset an existing counter
        assert_eq!(add_saturating(&store, "k", 1), Some(6));
    }

    #[test]
    fn saturating_counters_never_go_negative() {
        let store = MemoryStore::default();
        ensure_counter(&store, "n");
        assert_eq!(add_saturating(&store, "n", 2), Some(2));
        assert_eq!(add_saturating(&store, "n", -1), Some(1));
        assert_eq!(add_saturating(&store, "n", -5), Some(0));
        assert_eq!(read_u64(&store, "n"), 0);
        assert_eq!(read_u64(&store, "missing"), 0);
    }
}
