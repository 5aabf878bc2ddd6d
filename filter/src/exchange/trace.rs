//! A request's span attributes, with tracing on (`jairouter.tracing`): what the filter knows
//! of the request, as filter state the bootstrap's tracing custom tags read when Envoy finishes
//! the span (see `contract::SPAN_ATTRIBUTES`). Without tracing nothing here runs.

use super::Exchange;
use crate::contract::{
    SPAN_INPUT_TOKENS, SPAN_INSTANCE, SPAN_OUTPUT_TOKENS, SPAN_REQUEST_MODEL, SPAN_RESPONSE_MODEL,
    SPAN_SERVICE,
};
use crate::host::Host;
use crate::usage::Usage;

impl Exchange {
    /// One filter-state write per attribute the request has (a refused request may have no
    /// model or instance): up to six host calls, once per request.
    pub(super) fn write_span_attributes(&self, host: &dyn Host, usage: Option<Usage>) {
        let m = &self.measure;
        let asked = m
            .requested_model
            .as_deref()
            .or((!m.model.is_empty()).then_some(m.model.as_str()));
        let input = usage.and_then(|u| u.prompt_tokens).map(|n| n.to_string());
        let output = usage.map(|u| {
            u.completion_tokens
                .unwrap_or(u.estimated_completion)
                .to_string()
        });
        let attributes = [
            (SPAN_SERVICE, m.service),
            (SPAN_REQUEST_MODEL, asked),
            (SPAN_RESPONSE_MODEL, m.served_model.as_deref()),
            (SPAN_INSTANCE, self.instance()),
            (SPAN_INPUT_TOKENS, input.as_deref()),
            (SPAN_OUTPUT_TOKENS, output.as_deref()),
        ];
        for (name, value) in attributes {
            if let Some(value) = value {
                host.set_property(&[name], value.as_bytes());
            }
        }
    }
}
