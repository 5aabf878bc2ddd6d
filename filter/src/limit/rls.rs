//! The rate-limit service's wire format: the few protobuf messages of Envoy's rate-limit
//! protocol the gateway sends and reads, and our `Settle` call (`envoy/ratelimit/PROTOCOL.md`).
//! Written by hand (a protobuf library would cost the filter more bytes than these messages
//! take): encoding is a handful of varints and length-prefixed fields; decoding reads what it
//! knows, skips what it does not, and refuses anything malformed or past its bounds.

/// `envoy.service.ratelimit.v3.RateLimitService`
pub const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const RLS_METHOD: &str = "ShouldRateLimit";
/// Ours: settles token budgets (charges and refunds).
pub const SETTLE_SERVICE: &str = "jairouter.ratelimit.v1.TokenBudgets";
pub const SETTLE_METHOD: &str = "Settle";

/// At most this many statuses are read from an answer (the gateway never sends more
/// descriptors than it has limits, far fewer).
pub const MAX_STATUSES: usize = 64;

/// `RateLimitUnit`: the period a limit's amount refills over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlsUnit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
}

impl RlsUnit {
    pub const ALL: [RlsUnit; 4] = [
        RlsUnit::Second,
        RlsUnit::Minute,
        RlsUnit::Hour,
        RlsUnit::Day,
    ];

    pub fn seconds(self) -> u64 {
        match self {
            RlsUnit::Second => 1,
            RlsUnit::Minute => 60,
            RlsUnit::Hour => 3_600,
            RlsUnit::Day => 86_400,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RlsUnit::Second => "second",
            RlsUnit::Minute => "minute",
            RlsUnit::Hour => "hour",
            RlsUnit::Day => "day",
        }
    }
}

/// One bucket a request draws from, as the service sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `("limit", name)`, `("bucket", label)`.
    pub limit_name: String,
    pub bucket: String,
    pub per_unit: u32,
    pub unit: RlsUnit,
    /// Requests (1) or tokens taken.
    pub hits: u64,
}

/// What the service said of one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    pub over_limit: bool,
    pub remaining: u32,
    pub reset_ns: u64,
}

/// The service's answer to `ShouldRateLimit`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    pub over_limit: bool,
    pub statuses: Vec<Status>,
}

/// A settlement of one bucket: `delta` more tokens taken (fewer when negative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub descriptor: Descriptor,
    pub delta: i64,
}

/// `RateLimitRequest { domain = 1; descriptors = 2 }`, each descriptor with its own
/// `hits_addend` (field 3) and `limit` override (field 2).
pub fn encode_request<'a>(
    domain: &str,
    descriptors: impl IntoIterator<Item = &'a Descriptor>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put_bytes(&mut out, 1, domain.as_bytes());
    for descriptor in descriptors {
        let message = encode_descriptor(descriptor, true);
        put_bytes(&mut out, 2, &message);
    }
    out
}

/// `SettleRequest { domain = 1; settlements = 2 }`, `Settlement { descriptor = 1; sint64 delta = 2 }`.
pub fn encode_settle(domain: &str, settlements: &[Settlement]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + settlements.len() * 96);
    put_bytes(&mut out, 1, domain.as_bytes());
    for settlement in settlements {
        let mut message = Vec::new();
        put_bytes(
            &mut message,
            1,
            &encode_descriptor(&settlement.descriptor, false),
        );
        put_varint_field(&mut message, 2, zigzag(settlement.delta));
        put_bytes(&mut out, 2, &message);
    }
    out
}

fn encode_descriptor(descriptor: &Descriptor, with_hits: bool) -> Vec<u8> {
    let mut message = Vec::new();
    for (key, value) in [
        ("limit", descriptor.limit_name.as_str()),
        ("bucket", descriptor.bucket.as_str()),
    ] {
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, key.as_bytes());
        put_bytes(&mut entry, 2, value.as_bytes());
        put_bytes(&mut message, 1, &entry);
    }
    let mut limit = Vec::new();
    put_varint_field(&mut limit, 1, u64::from(descriptor.per_unit));
    put_varint_field(&mut limit, 2, descriptor.unit as u64);
    put_bytes(&mut message, 2, &limit);
    if with_hits {
        // google.protobuf.UInt64Value { value = 1 }: present even for 0 (a check without taking).
        let mut hits = Vec::new();
        put_varint_field(&mut hits, 1, descriptor.hits);
        put_bytes(&mut message, 3, &hits);
    }
    message
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, value);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `RateLimitResponse` as a service would send it (for tests and the fuzzer's seeds).
pub fn encode_answer(answer: &Answer) -> Vec<u8> {
    let code = |over: bool| if over { 2 } else { 1 };
    let mut out = Vec::new();
    put_varint_field(&mut out, 1, code(answer.over_limit));
    for status in &answer.statuses {
        let mut message = Vec::new();
        put_varint_field(&mut message, 1, code(status.over_limit));
        put_varint_field(&mut message, 3, u64::from(status.remaining));
        let mut duration = Vec::new();
        put_varint_field(&mut duration, 1, status.reset_ns / 1_000_000_000);
        put_varint_field(&mut duration, 2, status.reset_ns % 1_000_000_000);
        put_bytes(&mut message, 4, &duration);
        put_bytes(&mut out, 2, &message);
    }
    out
}

/// Why an answer could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Reads `RateLimitResponse`: the overall code (1) and the statuses (2); everything else
/// (headers to add, metadata, quota) is skipped.
pub fn decode_answer(bytes: &[u8]) -> Result<Answer, Malformed> {
    let mut answer = Answer::default();
    let mut reader = Reader { bytes, at: 0 };
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Varint(code)) => answer.over_limit = code == 2,
            (2, Value::Bytes(status)) => {
                if answer.statuses.len() >= MAX_STATUSES {
                    return Err(Malformed);
                }
                answer.statuses.push(decode_status(status)?);
            }
            _ => {}
        }
    }
    Ok(answer)
}

fn decode_status(bytes: &[u8]) -> Result<Status, Malformed> {
    let mut status = Status::default();
    let mut reader = Reader { bytes, at: 0 };
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Varint(code)) => status.over_limit = code == 2,
            (3, Value::Varint(remaining)) => {
                status.remaining = u32::try_from(remaining).unwrap_or(u32::MAX);
            }
            (4, Value::Bytes(duration)) => status.reset_ns = decode_duration(duration)?,
            _ => {}
        }
    }
    Ok(status)
}

/// `google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2 }`, as ns (negative: 0).
fn decode_duration(bytes: &[u8]) -> Result<u64, Malformed> {
    let (mut seconds, mut nanos) = (0i64, 0i64);
    let mut reader = Reader { bytes, at: 0 };
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Varint(s)) => seconds = s as i64,
            (2, Value::Varint(n)) => nanos = i64::from(n as i32),
            _ => {}
        }
    }
    let ns = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    Ok(u64::try_from(ns.max(0)).unwrap_or(u64::MAX))
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or(Malformed)?;
            self.at += 1;
            n |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(n);
            }
        }
        Err(Malformed)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(len).ok_or(Malformed)?;
        let slice = self.bytes.get(self.at..end).ok_or(Malformed)?;
        self.at = end;
        Ok(slice)
    }

    /// The next field, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, Malformed> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 {
            return Err(Malformed);
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| Malformed)?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return Err(Malformed),
        };
        Ok(Some((field, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn descriptor(hits: u64) -> Descriptor {
        Descriptor {
            limit_name: "model.rate-limit".into(),
            bucket: "chat".into(),
            per_unit: 300,
            unit: RlsUnit::Minute,
            hits,
        }
    }

    /// Every field of a message, as (number, bytes of a LEN field or the varint).
    fn fields(bytes: &[u8]) -> Vec<(u64, Vec<u8>, u64)> {
        let mut reader = Reader { bytes, at: 0 };
        let mut out = Vec::new();
        while let Some((field, value)) = reader.field().unwrap() {
            out.push(match value {
                Value::Varint(n) => (field, Vec::new(), n),
                Value::Bytes(b) => (field, b.to_vec(), 0),
                Value::Fixed => (field, Vec::new(), 0),
            });
        }
        out
    }

    #[test]
    fn a_request_is_encoded_as_protobuf_reads_it() {
        let bytes = encode_request("jairouter", &[descriptor(1), descriptor(250)]);
        let top = fields(&bytes);
        assert_eq!(top[0], (1, b"jairouter".to_vec(), 0));
        assert_eq!(top.len(), 3);
        let descriptor = fields(&top[1].1);
        let entry = |at: usize| {
            let e = fields(&descriptor[at].1);
            (
                String::from_utf8(e[0].1.clone()).unwrap(),
                String::from_utf8(e[1].1.clone()).unwrap(),
            )
        };
        assert_eq!(entry(0), ("limit".into(), "model.rate-limit".into()));
        assert_eq!(entry(1), ("bucket".into(), "chat".into()));
        // limit {requests_per_unit: 300, unit: MINUTE}
        assert_eq!(descriptor[2].0, 2);
        assert_eq!(
            fields(&descriptor[2].1),
            vec![(1, vec![], 300), (2, vec![], 2)]
        );
        // hits_addend {value: 1}; the second descriptor's 250
        assert_eq!(descriptor[3].0, 3);
        assert_eq!(fields(&descriptor[3].1), vec![(1, vec![], 1)]);
        let second = fields(&top[2].1);
        assert_eq!(fields(&second[3].1), vec![(1, vec![], 250)]);
    }

    #[test]
    fn settlements_carry_signed_deltas() {
        let refund = Settlement {
            descriptor: descriptor(0),
            delta: -3,
        };
        let bytes = encode_settle("d", &[refund]);
        let top = fields(&bytes);
        let settlement = fields(&top[1].1);
        // zigzag(-3) = 5, and no hits_addend in a settlement's descriptor.
        assert_eq!(settlement[1], (2, vec![], 5));
        assert_eq!(fields(&settlement[0].1).len(), 3);
        assert_eq!(zigzag(3), 6);
        assert_eq!(zigzag(i64::MIN), u64::MAX);
    }

    #[test]
    fn an_answer_is_read_with_unknown_fields_skipped() {
        let mut duration = Vec::new();
        put_varint_field(&mut duration, 1, 1);
        put_varint_field(&mut duration, 2, 500_000_000);
        let mut ok = Vec::new();
        put_varint_field(&mut ok, 1, 1);
        put_bytes(&mut ok, 2, b"\x08\x05\x10\x01"); // current_limit, skipped
        put_varint_field(&mut ok, 3, 7);
        put_bytes(&mut ok, 4, &duration);
        let mut over = Vec::new();
        put_varint_field(&mut over, 1, 2);
        let mut bytes = Vec::new();
        put_varint_field(&mut bytes, 1, 2);
        put_bytes(&mut bytes, 2, &ok);
        put_bytes(&mut bytes, 2, &over);
        put_bytes(&mut bytes, 3, b"\x0a\x02ab"); // a header to add
        bytes.extend_from_slice(b"\x49\x01\x02\x03\x04\x05\x06\x07\x08"); // fixed64, field 9
        bytes.extend_from_slice(b"\x55\x01\x02\x03\x04"); // fixed32, field 10
        let answer = decode_answer(&bytes).unwrap();
        assert!(answer.over_limit);
        assert_eq!(
            answer.statuses,
            vec![
                Status {
                    over_limit: false,
                    remaining: 7,
                    reset_ns: 1_500_000_000
                },
                Status {
                    over_limit: true,
                    remaining: 0,
                    reset_ns: 0
                }
            ]
        );
    }

    #[test]
    fn malformed_answers_are_refused_not_guessed() {
        for bad in [
            &b"\x12\x05\x08"[..],                                // length past the end
            b"\x08",                                             // varint cut short
            b"\x00\x01",                                         // field 0
            b"\x0b",                                             // a group
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", // varint too long
        ] {
            assert_eq!(decode_answer(bad), Err(Malformed), "{bad:?}");
        }
        assert_eq!(decode_answer(b""), Ok(Answer::default()));
        let many: Vec<u8> = (0..=MAX_STATUSES).flat_map(|_| [0x12, 0x00]).collect();
        assert_eq!(decode_answer(&many), Err(Malformed));
    }

    #[test]
    fn answers_survive_a_round_trip() {
        let answer = Answer {
            over_limit: true,
            statuses: vec![
                Status {
                    over_limit: false,
                    remaining: 3,
                    reset_ns: 61_000_000_123,
                },
                Status {
                    over_limit: true,
                    remaining: 0,
                    reset_ns: 999,
                },
            ],
        };
        assert_eq!(decode_answer(&encode_answer(&answer)), Ok(answer));
    }

    #[test]
    fn a_negative_duration_is_no_wait() {
        // seconds = -1 (ten-byte varint)
        let bytes = b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01";
        assert_eq!(decode_duration(bytes), Ok(0));
    }
}
