//! Everything a request asks of Envoy, as one small interface: the binding implements it with
//! proxy-wasm host calls, tests with `TestHost`, which also counts the calls by kind. Every
//! host call costs ~1–2 µs under V8 (more than the decision logic), so the counts for the
//! common request shapes are pinned by the exchange's tests.

use crate::headers::HeaderPairs;
use crate::store::{MemoryStore, SharedStore, StoreError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// The host calls a request makes, besides shared data (`SharedStore`).
pub trait Host: SharedStore {
    /// Nanoseconds since the epoch.
    fn now_ns(&self) -> u64;
    /// Every request header, in one call.
    fn request_headers(&self) -> HeaderPairs;
    fn set_request_header(&self, name: &str, value: &str);
    fn remove_request_header(&self, name: &str);
    /// Every response header, in one call.
    fn response_headers(&self) -> HeaderPairs;
    fn set_response_header(&self, name: &str, value: &str);
    fn remove_response_header(&self, name: &str);
    /// Replaces every response header at once (one call where several would be set).
    fn replace_response_headers(&self, headers: &[(&str, &str)]);
    /// `len` bytes of the buffered request body from `start` (fewer at its end).
    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>>;
    /// Replaces the first `len` buffered bytes of the request body; false when Envoy refused.
    fn replace_request_body(&self, len: usize, body: &[u8]) -> bool;
    /// The response body chunk Envoy holds now.
    fn response_body(&self, len: usize) -> Option<Vec<u8>>;
    /// Replaces the first `len` bytes of that chunk (a translated answer); false when refused.
    fn replace_response_body(&self, len: usize, body: &[u8]) -> bool;
    /// An Envoy attribute (`source.address`, `response.code_details`, metadata...).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Filter state (the access log's `jairouter` summary).
    fn set_property(&self, path: &[&str], value: &[u8]);
    /// Answers the client from the filter.
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// A unary gRPC call through an Envoy cluster; its token, or `None` when Envoy refused it
    /// (no such cluster). The answer comes to the exchange's `on_grpc_answer`.
    fn dispatch_grpc(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Option<u32>;
    /// The message of the gRPC answer being delivered.
    fn grpc_answer(&self, len: usize) -> Option<Vec<u8>>;
    /// Lets a request held by the filter go on (after an answer it waited for).
    fn resume_request(&self);
}

/// A gRPC call as `TestHost` saw it: cluster, service, method, message.
pub type SentGrpc = (String, String, String, Vec<u8>);

/// The kinds of host call, as `TestHost` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    Clock,
    RequestHeaders,
    SetRequestHeader,
    RemoveRequestHeader,
    ResponseHeaders,
    SetResponseHeader,
    RemoveResponseHeader,
    ReplaceResponseHeaders,
    RequestBody,
    ReplaceRequestBody,
    ResponseBody,
    ReplaceResponseBody,
    Property,
    SetProperty,
    SendReply,
    SharedGet,
    SharedSet,
    DispatchGrpc,
    GrpcAnswer,
    ResumeRequest,
}

/// A local reply as `TestHost` saw it: status, headers, body.
pub type SentReply = (u32, Vec<(String, String)>, String);

/// An Envoy stand-in for unit tests: set what Envoy would hold, run the exchange, read what it
/// did and how many host calls of each kind it took.
#[derive(Default)]
pub struct TestHost {
    pub store: MemoryStore,
    pub now: Cell<u64>,
    pub request_headers: RefCell<Vec<(String, String)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub request_body: RefCell<Vec<u8>>,
    /// Request body bytes copied into the filter (`request_body`), in all.
    pub request_body_read: Cell<usize>,
    /// The response chunk Envoy holds in the current body callback.
    pub response_chunk: RefCell<Vec<u8>>,
    pub properties: RefCell<HashMap<String, Vec<u8>>>,
    pub replies: RefCell<Vec<SentReply>>,
    /// gRPC calls dispatched, in order (the token of the n-th is n + 1).
    pub grpc_calls: RefCell<Vec<SentGrpc>>,
    /// The message `grpc_answer` hands out.
    pub grpc_answer: RefCell<Vec<u8>>,
    /// `dispatch_grpc` refuses (Envoy knows no such cluster).
    pub grpc_refused: Cell<bool>,
    pub resumed: Cell<usize>,
    calls: RefCell<HashMap<Call, usize>>,
}

impl TestHost {
    fn count(&self, call: Call) {
        *self.calls.borrow_mut().entry(call).or_default() += 1;
    }

    /// How many calls of each kind were made since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<(Call, usize)> {
        let mut calls: Vec<_> = self.calls.borrow_mut().drain().collect();
        calls.sort();
        calls
    }

    /// All calls since the last `take_calls`, of any kind.
    pub fn total_calls(&self) -> usize {
        self.calls.borrow().values().sum()
    }

    pub fn request_header(&self, name: &str) -> Option<String> {
        find(&self.request_headers.borrow(), name)
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        find(&self.response_headers.borrow(), name)
    }

    pub fn property_text(&self, path: &[&str]) -> Option<String> {
        let bytes = self.properties.borrow().get(&path.join("."))?.clone();
        String::from_utf8(bytes).ok()
    }
}

fn find(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

fn set(headers: &RefCell<Vec<(String, String)>>, name: &str, value: &str) {
    let mut headers = headers.borrow_mut();
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    headers.push((name.to_string(), value.to_string()));
}

fn pairs(headers: &[(String, String)]) -> HeaderPairs {
    let pairs: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect();
    HeaderPairs::parse(&crate::headers::encode(&pairs))
}

impl SharedStore for TestHost {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.count(Call::SharedGet);
        self.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.count(Call::SharedSet);
        self.store.set(key, value, cas)
    }
}

impl Host for TestHost {
    fn now_ns(&self) -> u64 {
        self.count(Call::Clock);
        self.now.get()
    }

    fn request_headers(&self) -> HeaderPairs {
        self.count(Call::RequestHeaders);
        pairs(&self.request_headers.borrow())
    }

    fn set_request_header(&self, name: &str, value: &str) {
        self.count(Call::SetRequestHeader);
        set(&self.request_headers, name, value);
    }

    fn remove_request_header(&self, name: &str) {
        self.count(Call::RemoveRequestHeader);
        self.request_headers
            .borrow_mut()
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn response_headers(&self) -> HeaderPairs {
        self.count(Call::ResponseHeaders);
        pairs(&self.response_headers.borrow())
    }

    fn set_response_header(&self, name: &str, value: &str) {
        self.count(Call::SetResponseHeader);
        set(&self.response_headers, name, value);
    }

    fn remove_response_header(&self, name: &str) {
        self.count(Call::RemoveResponseHeader);
        self.response_headers
            .borrow_mut()
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn replace_response_headers(&self, headers: &[(&str, &str)]) {
        self.count(Call::ReplaceResponseHeaders);
        *self.response_headers.borrow_mut() = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
    }

    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        self.count(Call::RequestBody);
        let body = self.request_body.borrow();
        let end = start.saturating_add(len).min(body.len());
        let read = body.get(start..end).map(<[u8]>::to_vec);
        let copied = read.as_ref().map_or(0, Vec::len);
        self.request_body_read
            .set(self.request_body_read.get() + copied);
        read
    }

    fn replace_request_body(&self, len: usize, replacement: &[u8]) -> bool {
        self.count(Call::ReplaceRequestBody);
        let mut body = self.request_body.borrow_mut();
        let rest = body.get(len..).map(<[u8]>::to_vec).unwrap_or_default();
        *body = [replacement, rest.as_slice()].concat();
        true
    }

    fn response_body(&self, len: usize) -> Option<Vec<u8>> {
        self.count(Call::ResponseBody);
        let chunk = self.response_chunk.borrow();
        chunk.get(..len.min(chunk.len())).map(<[u8]>::to_vec)
    }

    fn replace_response_body(&self, len: usize, replacement: &[u8]) -> bool {
        self.count(Call::ReplaceResponseBody);
        let mut chunk = self.response_chunk.borrow_mut();
        let rest = chunk.get(len..).map(<[u8]>::to_vec).unwrap_or_default();
        *chunk = [replacement, rest.as_slice()].concat();
        true
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.count(Call::Property);
        self.properties.borrow().get(&path.join(".")).cloned()
    }

    fn set_property(&self, path: &[&str], value: &[u8]) {
        self.count(Call::SetProperty);
        self.properties
            .borrow_mut()
            .insert(path.join("."), value.to_vec());
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.count(Call::SendReply);
        let headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let body = String::from_utf8_lossy(body).into_owned();
        self.replies.borrow_mut().push((status, headers, body));
    }

    fn dispatch_grpc(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        _timeout_ms: u64,
    ) -> Option<u32> {
        self.count(Call::DispatchGrpc);
        if self.grpc_refused.get() {
            return None;
        }
        let mut calls = self.grpc_calls.borrow_mut();
        calls.push((
            cluster.into(),
            service.into(),
            method.into(),
            message.to_vec(),
        ));
        u32::try_from(calls.len()).ok()
    }

    fn grpc_answer(&self, len: usize) -> Option<Vec<u8>> {
        self.count(Call::GrpcAnswer);
        let answer = self.grpc_answer.borrow();
        answer.get(..len.min(answer.len())).map(<[u8]>::to_vec)
    }

    fn resume_request(&self) {
        self.count(Call::ResumeRequest);
        self.resumed.set(self.resumed.get() + 1);
    }
}
