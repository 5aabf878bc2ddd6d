//! One shared-data entry per subject a limit counts (a model, a service, an instance, an API
//! key, everything): the buckets of every limit that counts the same subject lie side by side
//! in it, so a request draws from a model's request limit and its token budget (or from an API
//! key's request and token quotas) with one read and one compare-and-swap instead of one each.
//!
//! Each bucket is a record tagged with its limit's fingerprint (name, scope, numbers): a reload
//! that changes one limit's numbers starts that bucket afresh and keeps the others'. A record
//! missing is a fresh bucket; records of limits the plan no longer has are kept by draws (a
//! worker still on the previous plan may be using them) and pruned when a configuration is
//! installed.
//!
//! Layout: records back to back, each `fingerprint: u64 LE, length: u32 LE, state`.

use crate::bytes::{u32_le, u64_le};

/// A record's header: the fingerprint and the state's length.
const HEADER: usize = 12;

/// The records of an entry, in stored order. Bytes that do not make a whole record end the
/// list: what follows is foreign, and its buckets start afresh.
// Out of line, as `encode`: every way of writing an entry calls them (smaller .wasm).
#[inline(never)]
pub fn parse(bytes: Option<&[u8]>) -> Vec<(u64, &[u8])> {
    let mut records = Vec::new();
    let mut rest = bytes.unwrap_or_default();
    while let (Some(fingerprint), Some(len)) = (u64_le(rest, 0), u32_le(rest, 8)) {
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|len| HEADER.checked_add(len))
        else {
            break;
        };
        let (Some(state), Some(tail)) = (rest.get(HEADER..end), rest.get(end..)) else {
            break;
        };
        records.push((fingerprint, state));
        rest = tail;
    }
    records
}

/// The state of the limit with `fingerprint`; `None` (a fresh bucket) when it has none.
pub fn find<'a>(records: &[(u64, &'a [u8])], fingerprint: u64) -> Option<&'a [u8]> {
    records
        .iter()
        .find(|(f, _)| *f == fingerprint)
        .map(|(_, state)| *state)
}

/// The entry with `changed` states in place of the records of the same fingerprint (appended
/// where there was none), every other record kept as it was.
#[inline(never)]
pub fn encode(records: &[(u64, &[u8])], changed: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let size = |states: &mut dyn Iterator<Item = usize>| states.map(|n| HEADER + n).sum::<usize>();
    let mut out = Vec::with_capacity(
        size(&mut records.iter().map(|(_, s)| s.len()))
            + size(&mut changed.iter().map(|(_, s)| s.len())),
    );
    let mut push = |fingerprint: u64, state: &[u8]| {
        let len = u32::try_from(state.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(state.get(..len as usize).unwrap_or(state));
    };
    for (fingerprint, state) in records {
        let state = find_changed(changed, *fingerprint).unwrap_or(state);
        push(*fingerprint, state);
    }
    for (fingerprint, state) in changed {
        if find(records, *fingerprint).is_none() {
            push(*fingerprint, state);
        }
    }
    out
}

fn find_changed(changed: &[(u64, Vec<u8>)], fingerprint: u64) -> Option<&[u8]> {
    changed
        .iter()
        .find(|(f, _)| *f == fingerprint)
        .map(|(_, state)| state.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn records_round_trip_and_changes_replace_or_append() {
        let empty = encode(&[], &[]);
        assert!(parse(Some(&empty)).is_empty());
        let two = encode(&[], &[(1, vec![1, 1]), (2, vec![])]);
        let records = parse(Some(&two));
        assert_eq!(records, vec![(1, &[1u8, 1][..]), (2, &[][..])]);
        let three = encode(&records, &[(2, vec![9; 3]), (3, vec![3])]);
        let records = parse(Some(&three));
        assert_eq!(find(&records, 1), Some(&[1u8, 1][..]));
        assert_eq!(find(&records, 2), Some(&[9u8; 3][..]));
        assert_eq!(find(&records, 3), Some(&[3u8][..]));
        assert_eq!(find(&records, 4), None);
    }

    #[test]
    fn a_torn_or_foreign_tail_ends_the_records() {
        let mut bytes = encode(&[], &[(7, vec![5; 24])]);
        bytes.extend_from_slice(&8u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.push(0);
        assert_eq!(parse(Some(&bytes)), vec![(7, &[5u8; 24][..])]);
        assert!(parse(Some(&[1, 2, 3])).is_empty());
        assert!(parse(None).is_empty());
    }
}
