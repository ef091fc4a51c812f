//! What a response says: model, token usage, finish reason, error; from a JSON body, SSE
//! events, or NDJSON lines. (STUB: interface only.)

use super::detect::ApiKind;
use crate::protocol::sse::SseEvent;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResponseSummary {
    /// Model named by the response (may differ from the one requested).
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    /// Provider's id for the response (e.g. "chatcmpl-...", "msg_...").
    pub response_id: Option<String>,
    /// Error type or message when the API answered with an error object.
    pub error: Option<String>,
    /// Stream events (SSE events or NDJSON lines) seen.
    pub stream_events: u64,
    /// JSON documents that could not be parsed (counted, not fatal).
    pub unparsed: u64,
}

/// Accumulates a response's summary from whatever body form arrives.
pub struct UsageCollector {
    api: ApiKind,
    summary: ResponseSummary,
}

impl UsageCollector {
    pub fn new(api: ApiKind) -> Self {
        Self { api, summary: ResponseSummary::default() }
    }

    /// A complete (decoded, possibly truncated) non-streamed JSON body.
    pub fn on_body(&mut self, body: &[u8]) {
        let _ = (body, self.api);
    }

    /// One Server-Sent Event of a streamed response.
    pub fn on_sse(&mut self, event: &SseEvent) {
        let _ = event;
    }

    /// One line of a newline-delimited JSON stream (Ollama native streams).
    pub fn on_json_line(&mut self, line: &[u8]) {
        let _ = line;
    }

    pub fn summary(&self) -> &ResponseSummary {
        &self.summary
    }
}
