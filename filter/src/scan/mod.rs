//! Incremental scanners that find the model name in a request body without buffering it.
//!
//! Each scanner is fed the body chunk by chunk and keeps only a small, bounded state, so a
//! multi-megabyte prompt or upload never has to sit in the VM's memory.

pub mod json;
pub mod multipart;

/// What a scanner knows after the bytes fed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// The model is not known yet: feed more bytes.
    NeedMore,
    /// The model name, decoded.
    Found(String),
    /// The body is complete (structurally) and has no model.
    Absent,
    /// The body is malformed, or breaks a bound; the reason is safe to show a client.
    Invalid(String),
}
