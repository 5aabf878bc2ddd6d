//! Envoy's serialized header map, as any bytes: parsing never panics or reads out of bounds,
//! and a well-formed map reads back as written.
#![no_main]
use jairouter_filter::headers::HeaderPairs;
use libfuzzer_sys::fuzz_target;

use jairouter_filter::headers::encode as serialize;

fuzz_target!(|data: &[u8]| {
    // Any bytes as a map.
    let headers = HeaderPairs::parse(data);
    for name in [":path", ":method", "content-type", "x-jairouter-model", ""] {
        let _ = headers.get(name);
        let _ = headers.contains(name);
    }
    // The same bytes as header lines `name: value`, serialized the way Envoy does.
    let pairs: Vec<(&[u8], &[u8])> = data
        .split(|b| *b == b'\n')
        .map(|line| match line.iter().position(|b| *b == b':') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &[][..]),
        })
        .collect();
    let headers = HeaderPairs::parse(&serialize(&pairs));
    for (name, value) in &pairs {
        if let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) {
            assert!(headers.contains(name));
            // The first header of that name (in any case) is the one `get` gives.
            let first = pairs
                .iter()
                .find(|(n, v)| {
                    std::str::from_utf8(n).is_ok_and(|n| n.eq_ignore_ascii_case(name))
                        && std::str::from_utf8(v).is_ok()
                })
                .and_then(|(_, v)| std::str::from_utf8(v).ok());
            assert_eq!(headers.get(name), first);
            let _ = value;
        }
    }
    // Every cut of a good map stays in bounds.
    let good = serialize(&pairs);
    let cut = data.first().map_or(0, |b| usize::from(*b)) % (good.len() + 1);
    let _ = HeaderPairs::parse(&good[..cut]);
});
