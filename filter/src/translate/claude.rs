//! placeholder until the protocol's translator lands.
use super::{Malformed, Refusal, ReplyContext, StreamTranslator};
use serde_json::{Map, Value};
pub fn chat_request(_: &Map<String, Value>, _: &str) -> Result<Value, Refusal> {
    Err(Refusal::Unsupported("x".into()))
}
pub fn embed_request(_: &Map<String, Value>, _: &str) -> Result<Value, Refusal> {
    Err(Refusal::Unsupported("x".into()))
}
pub fn chat_response(_: &[u8], _: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    Err(Malformed::new("x"))
}
pub fn embed_response(_: &[u8], _: &ReplyContext) -> Result<Vec<u8>, Malformed> {
    Err(Malformed::new("x"))
}
pub fn error_message(_: &[u8]) -> Option<String> {
    None
}
pub struct ChatStream;
impl ChatStream {
    pub fn new(_: ReplyContext) -> ChatStream {
        ChatStream
    }
}
impl StreamTranslator for ChatStream {
    fn feed(&mut self, _: &[u8], _: &mut Vec<u8>) -> Result<(), Malformed> {
        Ok(())
    }
    fn finish(&mut self, _: &mut Vec<u8>) -> Result<(), Malformed> {
        Ok(())
    }
}
