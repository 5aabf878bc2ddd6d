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
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

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
}
