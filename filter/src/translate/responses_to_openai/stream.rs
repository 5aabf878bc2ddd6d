//! OpenAI chat chunks (SSE `data:` lines, `[DONE]`) → the Responses API's event stream.
//!
//! Skeleton: the event sequence lands in the next commits; until then the stream says nothing.

use crate::translate::openai::TokenUsage;
use crate::translate::{Malformed, ReplyContext, StreamTranslator};

/// A chat stream translated into Responses events as it passes.
#[derive(Debug)]
pub struct ResponseStream {
    #[allow(dead_code)]
    reply: ReplyContext,
}

impl ResponseStream {
    pub fn new(reply: ReplyContext) -> ResponseStream {
        ResponseStream { reply }
    }
}

impl StreamTranslator for ResponseStream {
    fn feed(&mut self, _chunk: &[u8], _out: &mut Vec<u8>) -> Result<(), Malformed> {
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<u8>) -> Result<(), Malformed> {
        Ok(())
    }

    fn usage(&self) -> Option<TokenUsage> {
        None
    }
}
