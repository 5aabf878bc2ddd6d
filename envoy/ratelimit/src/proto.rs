//! The protobuf messages of PROTOCOL.md, hand-coded (proto3 wire format, no code generation).
//!
//! Field numbers are those of `proto/`. Decoding skips unknown fields, rejects a known field
//! sent with the wrong wire type, truncated input and invalid UTF-8. Both directions are
//! implemented for every message so the tests (and any client written in Rust) can share them.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

type Result<T> = std::result::Result<T, DecodeError>;

// ---------------------------------------------------------------------------------------------
// Wire format

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or(DecodeError("truncated varint"))?;
            self.buf = rest;
            if i == 9 && b > 1 {
                return Err(DecodeError("varint overflows 64 bits"));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(DecodeError("truncated field"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field's (number, wire type), or None at the end.
    fn key(&mut self) -> Result<Option<(u32, u8)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(DecodeError("bad field number"));
        }
        Ok(Some((number as u32, (key & 7) as u8)))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| DecodeError("length too large"))?;
        self.take(n)
    }

    fn skip(&mut self, wire: u8) -> Result<()> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            _ => Err(DecodeError("unsupported wire type")),
        }
    }
}

fn expect(wire: u8, want: u8) -> Result<()> {
    if wire == want {
        Ok(())
    } else {
        Err(DecodeError("field has the wrong wire type"))
    }
}

fn string(r: &mut Reader<'_>, wire: u8) -> Result<String> {
    expect(wire, LEN)?;
    let b = r.bytes()?;
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
}

fn varint(r: &mut Reader<'_>, wire: u8) -> Result<u64> {
    expect(wire, VARINT)?;
    r.varint()
}

fn message<'a>(r: &mut Reader<'a>, wire: u8) -> Result<&'a [u8]> {
    expect(wire, LEN)?;
    r.bytes()
}

#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn key(&mut self, number: u32, wire: u8) {
        self.raw_varint((u64::from(number) << 3) | u64::from(wire));
    }

    /// A varint field, omitted when zero (proto3 default).
    fn varint(&mut self, number: u32, v: u64) {
        if v != 0 {
            self.key(number, VARINT);
            self.raw_varint(v);
        }
    }

    fn bytes(&mut self, number: u32, b: &[u8]) {
        self.key(number, LEN);
        self.raw_varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    /// A string field, omitted when empty.
    fn string(&mut self, number: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(number, s.as_bytes());
        }
    }

    fn message(&mut self, number: u32, m: &impl Message) {
        self.bytes(number, &m.encode());
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Encoding and decoding of one message.
pub trait Message: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(buf: &[u8]) -> Result<Self>;
}

// ---------------------------------------------------------------------------------------------
// envoy.extensions.common.ratelimit.v3 and envoy.service.ratelimit.v3

/// RateLimitUnit / RateLimit.Unit (the same numbering).
pub mod unit {
    pub const UNKNOWN: i32 = 0;
    pub const SECOND: i32 = 1;
    pub const MINUTE: i32 = 2;
    pub const HOUR: i32 = 3;
    pub const DAY: i32 = 4;

    /// The unit's length in seconds, None for UNKNOWN or an unknown value.
    pub fn seconds(unit: i32) -> Option<u64> {
        match unit {
            SECOND => Some(1),
            MINUTE => Some(60),
            HOUR => Some(3600),
            DAY => Some(86400),
            _ => None,
        }
    }
}

/// RateLimitResponse.Code.
pub mod code {
    pub const UNKNOWN: i32 = 0;
    pub const OK: i32 = 1;
    pub const OVER_LIMIT: i32 = 2;
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

impl Message for Entry {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.string(1, &self.key);
        w.string(2, &self.value);
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = Entry::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.key = string(&mut r, wire)?,
                2 => m.value = string(&mut r, wire)?,
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

/// RateLimitDescriptor.RateLimitOverride.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverride {
    pub requests_per_unit: u32,
    pub unit: i32,
}

impl Message for LimitOverride {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.varint(1, u64::from(self.requests_per_unit));
        w.varint(2, self.unit as i64 as u64);
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = LimitOverride::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.requests_per_unit = varint(&mut r, wire)? as u32,
                2 => m.unit = varint(&mut r, wire)? as i32,
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

/// google.protobuf.UInt64Value.
fn decode_u64_value(buf: &[u8]) -> Result<u64> {
    let mut v = 0;
    let mut r = Reader::new(buf);
    while let Some((n, wire)) = r.key()? {
        match n {
            1 => v = varint(&mut r, wire)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(v)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub entries: Vec<Entry>,
    pub limit: Option<LimitOverride>,
    /// The per-descriptor hits_addend (a UInt64Value wrapper: None when unset).
    pub hits_addend: Option<u64>,
}

impl Message for Descriptor {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        for e in &self.entries {
            w.message(1, e);
        }
        if let Some(l) = &self.limit {
            w.message(2, l);
        }
        if let Some(h) = self.hits_addend {
            let mut inner = Writer::default();
            inner.varint(1, h);
            w.bytes(3, &inner.buf);
        }
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = Descriptor::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.entries.push(Entry::decode(message(&mut r, wire)?)?),
                2 => m.limit = Some(LimitOverride::decode(message(&mut r, wire)?)?),
                3 => m.hits_addend = Some(decode_u64_value(message(&mut r, wire)?)?),
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitRequest {
    pub domain: String,
    pub descriptors: Vec<Descriptor>,
    /// 0 = unset.
    pub hits_addend: u32,
}

impl Message for RateLimitRequest {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.string(1, &self.domain);
        for d in &self.descriptors {
            w.message(2, d);
        }
        w.varint(3, u64::from(self.hits_addend));
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = RateLimitRequest::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.domain = string(&mut r, wire)?,
                2 => m
                    .descriptors
                    .push(Descriptor::decode(message(&mut r, wire)?)?),
                3 => m.hits_addend = varint(&mut r, wire)? as u32,
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

/// RateLimitResponse.RateLimit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrentLimit {
    pub requests_per_unit: u32,
    pub unit: i32,
    pub name: String,
}

impl Message for CurrentLimit {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.varint(1, u64::from(self.requests_per_unit));
        w.varint(2, self.unit as i64 as u64);
        w.string(3, &self.name);
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = CurrentLimit::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.requests_per_unit = varint(&mut r, wire)? as u32,
                2 => m.unit = varint(&mut r, wire)? as i32,
                3 => m.name = string(&mut r, wire)?,
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

/// google.protobuf.Duration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Duration {
    pub seconds: i64,
    pub nanos: i32,
}

impl Duration {
    pub fn from_micros(us: u64) -> Self {
        Duration {
            seconds: (us / 1_000_000) as i64,
            nanos: ((us % 1_000_000) * 1000) as i32,
        }
    }

    pub fn as_std(&self) -> std::time::Duration {
        std::time::Duration::new(self.seconds.max(0) as u64, self.nanos.max(0) as u32)
    }
}

impl Message for Duration {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.varint(1, self.seconds as u64);
        w.varint(2, self.nanos as i64 as u64);
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = Duration::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.seconds = varint(&mut r, wire)? as i64,
                2 => m.nanos = varint(&mut r, wire)? as i32,
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescriptorStatus {
    pub code: i32,
    pub current_limit: Option<CurrentLimit>,
    pub limit_remaining: u32,
    pub duration_until_reset: Option<Duration>,
}

impl Message for DescriptorStatus {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.varint(1, self.code as i64 as u64);
        if let Some(l) = &self.current_limit {
            w.message(2, l);
        }
        w.varint(3, u64::from(self.limit_remaining));
        if let Some(d) = &self.duration_until_reset {
            w.message(4, d);
        }
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = DescriptorStatus::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.code = varint(&mut r, wire)? as i32,
                2 => m.current_limit = Some(CurrentLimit::decode(message(&mut r, wire)?)?),
                3 => m.limit_remaining = varint(&mut r, wire)? as u32,
                4 => m.duration_until_reset = Some(Duration::decode(message(&mut r, wire)?)?),
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

/// RateLimitResponse (response_headers_to_add and the rest are never sent, skipped on decode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitResponse {
    pub overall_code: i32,
    pub statuses: Vec<DescriptorStatus>,
}

impl Message for RateLimitResponse {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.varint(1, self.overall_code as i64 as u64);
        for s in &self.statuses {
            w.message(2, s);
        }
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = RateLimitResponse::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.overall_code = varint(&mut r, wire)? as i32,
                2 => m
                    .statuses
                    .push(DescriptorStatus::decode(message(&mut r, wire)?)?),
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

// ---------------------------------------------------------------------------------------------
// jairouter.ratelimit.v1

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub descriptor: Descriptor,
    pub delta: i64,
}

impl Message for Settlement {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.message(1, &self.descriptor);
        w.varint(2, zigzag(self.delta));
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = Settlement::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.descriptor = Descriptor::decode(message(&mut r, wire)?)?,
                2 => m.delta = unzigzag(varint(&mut r, wire)?),
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleRequest {
    pub domain: String,
    pub settlements: Vec<Settlement>,
}

impl Message for SettleRequest {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.string(1, &self.domain);
        for s in &self.settlements {
            w.message(2, s);
        }
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = SettleRequest::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.domain = string(&mut r, wire)?,
                2 => m
                    .settlements
                    .push(Settlement::decode(message(&mut r, wire)?)?),
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleResponse {
    pub applied: u32,
}

impl Message for SettleResponse {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.varint(1, u64::from(self.applied));
        w.buf
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut m = SettleResponse::default();
        let mut r = Reader::new(buf);
        while let Some((n, wire)) = r.key()? {
            match n {
                1 => m.applied = varint(&mut r, wire)? as u32,
                _ => r.skip(wire)?,
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(limit: &str, bucket: &str, n: u32, hits: Option<u64>) -> Descriptor {
        Descriptor {
            entries: vec![
                Entry {
                    key: "limit".into(),
                    value: limit.into(),
                },
                Entry {
                    key: "bucket".into(),
                    value: bucket.into(),
                },
            ],
            limit: Some(LimitOverride {
                requests_per_unit: n,
                unit: unit::MINUTE,
            }),
            hits_addend: hits,
        }
    }

    #[test]
    fn request_round_trips() {
        let req = RateLimitRequest {
            domain: "jairouter".into(),
            descriptors: vec![
                descriptor("model.rate-limit", "chat/gpt-4o", 100, Some(1)),
                descriptor("tokens", "all", 4_000_000_000, Some(0)),
                Descriptor::default(),
            ],
            hits_addend: 7,
        };
        assert_eq!(RateLimitRequest::decode(&req.encode()), Ok(req));
    }

    #[test]
    fn response_round_trips() {
        let resp = RateLimitResponse {
            overall_code: code::OVER_LIMIT,
            statuses: vec![
                DescriptorStatus {
                    code: code::OVER_LIMIT,
                    current_limit: Some(CurrentLimit {
                        requests_per_unit: 5,
                        unit: unit::SECOND,
                        name: String::new(),
                    }),
                    limit_remaining: 0,
                    duration_until_reset: Some(Duration::from_micros(1_234_567)),
                },
                DescriptorStatus {
                    code: code::OK,
                    ..Default::default()
                },
            ],
        };
        assert_eq!(RateLimitResponse::decode(&resp.encode()), Ok(resp));
    }

    #[test]
    fn settle_round_trips_signed_deltas() {
        for delta in [0, 1, -1, 1000, -1000, i64::MAX, i64::MIN] {
            let req = SettleRequest {
                domain: "d".into(),
                settlements: vec![Settlement {
                    descriptor: descriptor("tokens", "all", 10, None),
                    delta,
                }],
            };
            assert_eq!(SettleRequest::decode(&req.encode()), Ok(req));
        }
        let resp = SettleResponse { applied: 3 };
        assert_eq!(SettleResponse::decode(&resp.encode()), Ok(resp));
    }

    #[test]
    fn zigzag_matches_protobuf() {
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(-2), 3);
        assert_eq!(unzigzag(4294967294), 2147483647);
        assert_eq!(unzigzag(4294967295), -2147483648);
    }

    #[test]
    fn known_bytes_decode() {
        // domain "d", one descriptor {entries [{key "k", value "v"}], hits_addend {value 5}}
        let bytes = [
            0x0a, 1, b'd', 0x12, 12, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x1a, 2, 0x08, 5,
        ];
        let req = RateLimitRequest::decode(&bytes).unwrap_or_default();
        assert_eq!(req.domain, "d");
        assert_eq!(req.descriptors.len(), 1);
        assert_eq!(req.descriptors.first().and_then(|d| d.hits_addend), Some(5));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut bytes = RateLimitRequest {
            domain: "x".into(),
            ..Default::default()
        }
        .encode();
        // field 9 varint, field 10 fixed64, field 11 bytes, field 12 fixed32
        bytes.extend_from_slice(&[0x48, 0x96, 0x01]);
        bytes.extend_from_slice(&[0x51, 1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&[0x5a, 2, 0xff, 0xff]);
        bytes.extend_from_slice(&[0x65, 1, 2, 3, 4]);
        let req = RateLimitRequest::decode(&bytes);
        assert_eq!(req.map(|r| r.domain), Ok("x".to_string()));
    }

    #[test]
    fn malformed_input_is_rejected() {
        // truncated length
        assert!(RateLimitRequest::decode(&[0x0a, 5, b'a']).is_err());
        // truncated varint
        assert!(RateLimitRequest::decode(&[0x18, 0x80]).is_err());
        // wrong wire type for domain (varint instead of bytes)
        assert!(RateLimitRequest::decode(&[0x08, 1]).is_err());
        // invalid UTF-8
        assert!(RateLimitRequest::decode(&[0x0a, 1, 0xff]).is_err());
        // field number 0
        assert!(RateLimitRequest::decode(&[0x00, 1]).is_err());
        // group wire types
        assert!(RateLimitRequest::decode(&[0x4b]).is_err());
        // 11-byte varint
        assert!(RateLimitRequest::decode(&[
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ])
        .is_err());
    }

    #[test]
    fn duration_from_micros() {
        let d = Duration::from_micros(61_500_001);
        assert_eq!((d.seconds, d.nanos), (61, 500_001_000));
    }
}
