//! Helpers shared by the fuzz targets: how an input is cut into the chunks Envoy would hand the
//! filter.

/// Splits `data` into chunks whose sizes follow `seed`: 0 feeds one byte at a time, 255 feeds
/// everything at once, anything else cycles through sizes derived from it (1 to 64 bytes), so
/// every state of a scanner meets a chunk boundary somewhere in the corpus.
pub fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    match seed {
        0 => data.chunks(1).collect(),
        255 => vec![data],
        _ => {
            let mut out = Vec::new();
            let mut rest = data;
            let mut state = u32::from(seed);
            while !rest.is_empty() {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let size = ((state >> 16) % 64 + 1) as usize;
                let (head, tail) = rest.split_at(size.min(rest.len()));
                out.push(head);
                rest = tail;
            }
            out
        }
    }
}

/// The first byte (the chunking seed) and the rest.
pub fn split_seed(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((seed, rest)) => (*seed, rest),
        None => (255, &[]),
    }
}

/// The input up to the first `\n` and what follows it.
pub fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}
