//! The rate-limit algorithms over any policy within the configuration's bounds, any sequence of
//! times and costs, and (sometimes) corrupt state from shared data: never a panic, and from a
//! fresh bucket never more admissions than capacity + elapsed x rate. The state is kept as a
//! record of a shared entry (`limit::entry`) beside another limit's, which may be corrupt too:
//! the record reads back as written.
#![no_main]
use jairouter_filter::config::Algorithm;
use jairouter_filter::limit::bucket::{admit, admit_cost, is_idle, refund, settle, Params};
use jairouter_filter::limit::entry;
use libfuzzer_sys::fuzz_target;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        let n = self.0.len().min(8);
        word[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(word)
    }
    fn u8(&mut self) -> u8 {
        let b = self.0.first().copied().unwrap_or(0);
        self.0 = self.0.get(1..).unwrap_or_default();
        b
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let kind = input.u8();
    let params = if kind & 4 == 0 {
        let algorithm = match kind % 4 {
            0 => Algorithm::TokenBucket,
            1 => Algorithm::LeakyBucket,
            2 => Algorithm::SlidingWindow,
            _ => Algorithm::WarmUp,
        };
        // The ranges the configuration accepts.
        let rate = input.u64() % 1_000_000_000 + 1;
        let window = input.u64() % 3600 + 1;
        let (rate, window) = if algorithm == Algorithm::SlidingWindow {
            (
                rate % 10_000 + 1,
                window.min(10_000 / (rate % 10_000 + 1)).max(1),
            )
        } else {
            (rate, window)
        };
        Params {
            algorithm,
            capacity: input.u64() % 1_000_000_000 + 1,
            rate,
            period_secs: 1,
            window_ns: window * 1_000_000_000,
            warm_up_ns: (input.u64() % 86_400 + 1) * 1_000_000_000,
            cold_factor: input.u64() % 100 + 1,
        }
    } else {
        // API-key quotas and token budgets.
        let amount = input.u64() % 1_000_000_000_000 + 1;
        let period = [60, 86_400][usize::from(kind >> 3 & 1)];
        Params::per_period(amount, period)
    };
    let mut state: Option<Vec<u8>> = None;
    let mut now = input.u64() % (1 << 62) + 1;
    let start = now;
    let mut admitted: u128 = 0;
    let mut honest = true;
    // The entry the bucket lives in (as fingerprint 1), beside whatever else it holds.
    let mut shared: Vec<u8> = entry::encode(&[], &[(2, vec![7; 24])]);
    while !input.0.is_empty() {
        let op = input.u8();
        now = now.saturating_add(input.u64() % 10_000_000_000);
        match op % 8 {
            0..=3 => {
                let (next, verdict) = admit(&params, state.as_deref(), now);
                if verdict.admitted {
                    admitted += 1;
                }
                if let Some(next) = next {
                    state = Some(next);
                }
            }
            4 => {
                let cost = input.u64() % 1_000_000;
                let (next, _) = admit_cost(&params, state.as_deref(), now, cost);
                honest = false;
                if let Some(next) = next {
                    state = Some(next);
                }
            }
            5 => {
                let delta = input.u64() as i64;
                if params.algorithm != Algorithm::SlidingWindow {
                    state = Some(settle(&params, state.as_deref(), now, delta));
                    honest = false;
                }
            }
            6 => {
                let _ = is_idle(&params, state.as_deref(), now);
                let cost = input.u64() % 1000;
                let _ = refund(&params, state.as_deref(), now, cost);
            }
            _ => {
                // Shared data holding anything at all.
                let len = usize::from(input.u8());
                let take = len.min(input.0.len());
                state = Some(input.0[..take].to_vec());
                // Its entry holding anything at all, too.
                shared = input.0[..take].to_vec();
                input.0 = &input.0[take..];
                honest = false;
            }
        }
        if let Some(current) = &state {
            let records = entry::parse(Some(&shared));
            shared = entry::encode(&records, &[(1, current.clone())]);
            let records = entry::parse(Some(&shared));
            assert_eq!(entry::find(&records, 1), Some(current.as_slice()));
            state = entry::find(&records, 1).map(<[u8]>::to_vec);
        }
    }
    if honest {
        let elapsed = u128::from(now - start);
        let allowed = u128::from(params.limit())
            + elapsed * u128::from(params.rate) / 1_000_000_000 / u128::from(params.period_secs)
            + 1;
        assert!(admitted <= allowed, "admitted {admitted} > {allowed}");
    }
});
