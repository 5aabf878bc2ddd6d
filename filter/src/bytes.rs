//! Reading and hashing byte strings: the little-endian integers everything in shared data (and
//! proxy-wasm's serialized maps) is made of, and the one fast 64-bit hash that places ring points,
//! fingerprints clients and names state keys.

/// The little-endian u32 at `at`, if `bytes` holds four bytes there.
pub fn u32_le(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    <[u8; 4]>::try_from(raw).ok().map(u32::from_le_bytes)
}

/// The little-endian u64 at `at`, if `bytes` holds eight bytes there.
pub fn u64_le(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    <[u8; 8]>::try_from(raw).ok().map(u64::from_le_bytes)
}

/// FNV-1a, then a splitmix64 finish so that similar keys ("10.0.0.1", "10.0.0.2") land far apart.
/// Not for secrets. Its values name shared-data keys: changing it loses state on reload.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// The splitmix64 finish: every input bit moves about half the output bits.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The hasher of the filter's own maps, eight bytes a step (std's SipHash is one of the larger
/// costs of a request in wasm: ~3% of its instructions). Not keyed, so only for maps no client
/// can insert into: their keys are configured names (models, instances, metric series made of
/// them) or digests, built at configuration or grown only by configured names, so nobody can
/// choose keys that collide. A lookup with a client's string (a model name) stays one probe
/// sequence of a fixed table.
#[derive(Default, Clone, Copy)]
pub struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in words.by_ref() {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.add(u64::from_le_bytes(w));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            for (to, from) in w.iter_mut().zip(rest) {
                *to = *from;
            }
            // The length tells "ab" from "ab\0".
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// A `HashMap` with `WordHasher` (see there for which maps may use it).
pub type FastMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<WordHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn reads_in_bounds_only() {
        let bytes = [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(u32_le(&bytes, 0), Some(1));
        assert_eq!(u32_le(&bytes, 8), Some(0));
        assert_eq!(u32_le(&bytes, 9), None);
        assert_eq!(u64_le(&bytes, 4), Some(2));
        assert_eq!(u64_le(&bytes, 5), None);
        assert_eq!(u64_le(&bytes, usize::MAX), None);
    }

    #[test]
    fn hash_is_stable() {
        // State keys are named by it: a change here resets every breaker on upgrade.
        assert_eq!(hash64(b"jairouter"), 0xab9d_0077_c876_341f);
        assert_ne!(hash64(b"10.0.0.1"), hash64(b"10.0.0.2"));
    }

    #[test]
    fn the_word_hasher_tells_near_keys_apart() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let build = BuildHasherDefault::<WordHasher>::default();
        let keys = [
            "",
            "a",
            "ab",
            "ab\0",
            "abcdefgh",
            "abcdefgh\0",
            "abcdefghi",
            "jairouter_requests_total.service=chat;",
            "jairouter_requests_total.service=chau;",
        ];
        let hashes: Vec<u64> = keys.iter().map(|k| build.hash_one(k)).collect();
        for (i, a) in hashes.iter().enumerate() {
            for b in hashes.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        // The same key, the same hash (maps rely on it).
        assert_eq!(build.hash_one("chat"), build.hash_one(String::from("chat")));
        let mut map: FastMap<String, u32> = FastMap::default();
        for (n, k) in keys.iter().enumerate() {
            map.insert((*k).to_string(), n as u32);
        }
        assert_eq!(map.get("ab\0"), Some(&3));
        assert_eq!(map.len(), keys.len());
    }
}
