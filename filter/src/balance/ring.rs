//! A consistent-hash ring with weight-proportional virtual nodes, for ip-hash, consistent-hash
//! and header-hash. Built once per model when the configuration loads; a lookup is a binary
//! search. Points are placed by instance id, so adding or removing an instance moves only the
//! keys on its own arcs (about 1/N of them).

use crate::bytes::hash64;

/// Rings larger than this are thinned proportionally: more points buy no better spread.
const MAX_POINTS: u64 = 65_536;

#[derive(Debug, Clone, Default)]
pub struct HashRing {
    /// (point, position into the pool's routable instances), sorted by point.
    points: Vec<(u64, u16)>,
}

impl HashRing {
    /// `members` are (instance id, weight) of the pool's routable instances, in order.
    /// An instance of average weight gets `virtual_nodes` points; others in proportion.
    pub fn build(members: &[(&str, u64)], virtual_nodes: u64) -> HashRing {
        let total_weight: u64 = members.iter().map(|(_, w)| *w).sum();
        let count = u64::try_from(members.len()).unwrap_or(u64::MAX);
        if total_weight == 0 || count == 0 {
            return HashRing::default();
        }
        let per_instance = |w: u64| -> u64 {
            let share = u128::from(virtual_nodes) * u128::from(w) * u128::from(count)
                / u128::from(total_weight);
            u64::try_from(share).unwrap_or(u64::MAX).max(1)
        };
        let wanted: u64 = members.iter().map(|(_, w)| per_instance(*w)).sum();
        let scale = |n: u64| -> u64 {
            if wanted > MAX_POINTS {
                (u128::from(n) * u128::from(MAX_POINTS) / u128::from(wanted)).max(1) as u64
            } else {
                n
            }
        };
        let mut points = Vec::new();
        for (position, (id, weight)) in members.iter().enumerate() {
            let Ok(position) = u16::try_from(position) else {
                break;
            };
            for replica in 0..scale(per_instance(*weight)) {
                points.push((hash64(format!("{id}#{replica}").as_bytes()), position));
            }
        }
        points.sort_unstable();
        HashRing { points }
    }

    /// The position (into the routable instances) owning `key`: the first point at or after its
    /// hash, wrapping around.
    pub fn lookup(&self, key: &str) -> Option<usize> {
        let hash = hash64(key.as_bytes());
        let at = self.points.partition_point(|(point, _)| *point < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map(|(_, position)| usize::from(*position))
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn owners(ring: &HashRing, ids: &[&str], clients: usize) -> Vec<String> {
        (0..clients)
            .map(|c| {
                ids[ring
                    .lookup(&format!("10.1.{}.{}", c / 256, c % 256))
                    .unwrap()]
                .to_string()
            })
            .collect()
    }

    #[test]
    fn the_same_key_keeps_its_instance() {
        let ring = HashRing::build(&[("a", 1), ("b", 1), ("c", 1)], 150);
        let first = ring.lookup("192.168.0.7");
        for _ in 0..10 {
            assert_eq!(ring.lookup("192.168.0.7"), first);
        }
    }

    #[test]
    fn adding_an_instance_moves_about_a_quarter_of_the_keys() {
        let three = ["a", "b", "c"];
        let four = ["a", "b", "c", "d"];
        let before = owners(
            &HashRing::build(&[("a", 1), ("b", 1), ("c", 1)], 150),
            &three,
            1000,
        );
        let after = owners(
            &HashRing::build(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)], 150),
            &four,
            1000,
        );
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        // Ideal is 250; every moved key must have moved to the new instance.
        assert!((150..=350).contains(&moved), "moved {moved}");
        assert!(before.iter().zip(&after).all(|(x, y)| x == y || y == "d"));
    }

    #[test]
    fn weights_set_the_share_of_keys() {
        let ids = ["light", "heavy"];
        let ring = HashRing::build(&[("light", 1), ("heavy", 3)], 150);
        let heavy = owners(&ring, &ids, 4000)
            .iter()
            .filter(|o| *o == "heavy")
            .count();
        assert!((2600..=3400).contains(&heavy), "heavy got {heavy} of 4000");
    }

    #[test]
    fn rings_are_bounded_and_empty_rings_find_nothing() {
        let ids: Vec<String> = (0..2000).map(|i| format!("i{i}")).collect();
        let members: Vec<(&str, u64)> = ids.iter().map(|i| (i.as_str(), 1)).collect();
        let ring = HashRing::build(&members, 10_000);
        assert!(ring.points.len() as u64 <= MAX_POINTS + 2000);
        assert!(HashRing::build(&[], 150).lookup("x").is_none());
        assert!(HashRing::build(&[("a", 0)], 150).is_empty());
    }
}
