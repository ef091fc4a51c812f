//! What a response says: model, token usage, finish reason, error; from a JSON body, SSE
//! events, or NDJSON lines.
//!
//! One [`UsageCollector`] per response, fed whichever form the body takes. Every document
//! is read the way its API ([`ApiKind`]) writes it; later values overwrite earlier ones
//! field by field, so a stream's final usage wins while a field it omits (Anthropic's
//! `message_delta` has no input count) keeps its earlier value. A document that does not
//! parse is counted in [`ResponseSummary::unparsed`], never fatal: a truncated body simply
//! yields fewer fields.

use serde_json::Value;

use super::detect::ApiKind;
use crate::protocol::sse::SseEvent;

/// Longest string kept from a response (model, id, finish reason, error), in characters.
const MAX_TEXT_CHARS: usize = 200;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResponseSummary {
    /// Model named by the response (may differ from the one requested).
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Input tokens read from the provider's prompt cache, as reported: already part of
    /// `input_tokens` for OpenAI and Gemini, in addition to it for Anthropic.
    pub cache_read_tokens: Option<u64>,
    /// Input tokens written to the prompt cache (Anthropic), in addition to `input_tokens`.
    pub cache_write_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    /// Provider's id for the response (e.g. "chatcmpl-...", "msg_...").
    pub response_id: Option<String>,
    /// Error type or message when the API answered with an error object.
    pub error: Option<String>,
    /// Bytes of generated text seen: message content or stream deltas, not reasoning or
    /// tool-call arguments.
    pub output_text_bytes: u64,
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
        Self {
            api,
            summary: ResponseSummary::default(),
        }
    }

    /// A complete (decoded, possibly truncated) non-streamed JSON body.
    pub fn on_body(&mut self, body: &[u8]) {
        match self.parse(body) {
            // Gemini `:streamGenerateContent` without `alt=sse`: an array of responses.
            Some(Value::Array(items)) => items.iter().for_each(|item| self.absorb(item)),
            Some(value) => self.absorb(&value),
            None => {}
        }
    }

    /// One Server-Sent Event of a streamed response.
    pub fn on_sse(&mut self, event: &SseEvent) {
        self.summary.stream_events += 1;
        // OpenAI-style streams end with a `[DONE]` sentinel that is not JSON.
        if event.data.trim() == "[DONE]" {
            return;
        }
        if let Some(value) = self.parse(event.data.as_bytes()) {
            self.absorb(&value);
        }
    }

    /// One line of a newline-delimited JSON stream (Ollama native streams).
    pub fn on_json_line(&mut self, line: &[u8]) {
        if line.trim_ascii().is_empty() {
            return;
        }
        self.summary.stream_events += 1;
        if let Some(value) = self.parse(line) {
            self.absorb(&value);
        }
    }

    pub fn summary(&self) -> &ResponseSummary {
        &self.summary
    }

    /// None for a blank document (keep-alives, empty bodies) and, counted, for invalid JSON.
    fn parse(&mut self, bytes: &[u8]) -> Option<Value> {
        if bytes.trim_ascii().is_empty() {
            return None;
        }
        let parsed = serde_json::from_slice(bytes).ok();
        self.summary.unparsed += u64::from(parsed.is_none());
        parsed
    }

    fn absorb(&mut self, v: &Value) {
        self.error(v);
        match self.api {
            ApiKind::ChatCompletions | ApiKind::Completions | ApiKind::Embeddings => self.openai(v),
            ApiKind::Responses => self.responses(v),
            ApiKind::AnthropicMessages => self.anthropic(v),
            ApiKind::GeminiGenerateContent => self.gemini(v),
            ApiKind::OllamaChat | ApiKind::OllamaGenerate => self.ollama(v),
        }
    }

    /// Chat completion (or chunk), text completion, or embeddings list.
    fn openai(&mut self, v: &Value) {
        let s = &mut self.summary;
        set_str(&mut s.model, v.get("model"));
        set_str(&mut s.response_id, v.get("id"));
        // Null in every chunk but the last of its choice.
        set_str(&mut s.finish_reason, v.pointer("/choices/0/finish_reason"));
        for choice in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = choice
                .pointer("/message/content")
                .or_else(|| choice.pointer("/delta/content"));
            self.text(text.or_else(|| choice.get("text")));
        }
        self.usage(v.get("usage"));
    }

    /// Responses API: the response object, or a stream event that carries one or a delta.
    fn responses(&mut self, v: &Value) {
        match (v.get("response"), str_at(v, "type")) {
            // response.created / in_progress / completed / failed / incomplete: the deltas
            // already carried the text.
            (Some(response), _) => {
                self.error(response);
                self.response_object(response, false);
            }
            (None, Some("response.output_text.delta")) => self.text(v.get("delta")),
            _ if str_at(v, "object") == Some("response") => self.response_object(v, true),
            _ => {}
        }
    }

    fn response_object(&mut self, r: &Value, with_text: bool) {
        let s = &mut self.summary;
        set_str(&mut s.model, r.get("model"));
        set_str(&mut s.response_id, r.get("id"));
        set_str(&mut s.finish_reason, r.get("status"));
        if with_text {
            for item in r
                .get("output")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if str_at(part, "type") == Some("output_text") {
                        self.text(part.get("text"));
                    }
                }
            }
        }
        self.usage(r.get("usage"));
    }

    /// Anthropic message, or one of its stream events.
    fn anthropic(&mut self, v: &Value) {
        match str_at(v, "type") {
            Some("message") => self.anthropic_message(v, true),
            Some("message_start") => {
                if let Some(message) = v.get("message") {
                    self.anthropic_message(message, false);
                }
            }
            Some("message_delta") => {
                set_str(
                    &mut self.summary.finish_reason,
                    v.pointer("/delta/stop_reason"),
                );
                self.usage(v.get("usage"));
            }
            Some("content_block_delta") if str_at(&v["delta"], "type") == Some("text_delta") => {
                self.text(v.pointer("/delta/text"));
            }
            _ => {}
        }
    }

    fn anthropic_message(&mut self, m: &Value, with_text: bool) {
        let s = &mut self.summary;
        set_str(&mut s.model, m.get("model"));
        set_str(&mut s.response_id, m.get("id"));
        set_str(&mut s.finish_reason, m.get("stop_reason"));
        if with_text {
            for block in m
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if str_at(block, "type") == Some("text") {
                    self.text(block.get("text"));
                }
            }
        }
        self.usage(m.get("usage"));
    }

    /// Gemini GenerateContentResponse; a stream sends one per chunk with that chunk's text.
    fn gemini(&mut self, v: &Value) {
        let s = &mut self.summary;
        set_str(&mut s.model, v.get("modelVersion"));
        set_str(&mut s.response_id, v.get("responseId"));
        set_str(
            &mut s.finish_reason,
            v.pointer("/candidates/0/finishReason"),
        );
        // A blocked prompt gets no candidates, only the reason.
        set_str(
            &mut s.finish_reason,
            v.pointer("/promptFeedback/blockReason"),
        );
        if let Some(usage) = v.get("usageMetadata") {
            set_count(&mut s.input_tokens, usage.get("promptTokenCount"));
            set_count(&mut s.output_tokens, usage.get("candidatesTokenCount"));
            set_count(
                &mut s.cache_read_tokens,
                usage.get("cachedContentTokenCount"),
            );
        }
        for candidate in v
            .get("candidates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let parts = candidate
                .pointer("/content/parts")
                .and_then(Value::as_array);
            for part in parts.into_iter().flatten() {
                if part.get("thought") != Some(&Value::Bool(true)) {
                    self.text(part.get("text"));
                }
            }
        }
    }

    /// Ollama native response, or one line of its stream (the last, `done: true`, has the
    /// counts).
    fn ollama(&mut self, v: &Value) {
        let s = &mut self.summary;
        set_str(&mut s.model, v.get("model"));
        set_str(&mut s.finish_reason, v.get("done_reason"));
        set_count(&mut s.input_tokens, v.get("prompt_eval_count"));
        set_count(&mut s.output_tokens, v.get("eval_count"));
        // /api/chat carries `message.content`, /api/generate `response`.
        self.text(v.pointer("/message/content").or_else(|| v.get("response")));
    }

    /// A usage object, in either naming: `prompt_tokens`/`completion_tokens` (Chat
    /// Completions, embeddings) or `input_tokens`/`output_tokens` (Responses, Anthropic).
    fn usage(&mut self, usage: Option<&Value>) {
        let Some(u) = usage else { return };
        let s = &mut self.summary;
        set_count(
            &mut s.input_tokens,
            u.get("prompt_tokens").or_else(|| u.get("input_tokens")),
        );
        set_count(
            &mut s.output_tokens,
            u.get("completion_tokens")
                .or_else(|| u.get("output_tokens")),
        );
        let cached = u
            .get("cache_read_input_tokens")
            .or_else(|| u.pointer("/prompt_tokens_details/cached_tokens"));
        set_count(
            &mut s.cache_read_tokens,
            cached.or_else(|| u.pointer("/input_tokens_details/cached_tokens")),
        );
        set_count(
            &mut s.cache_write_tokens,
            u.get("cache_creation_input_tokens"),
        );
    }

    /// Error objects: `{"error": {"type"|"status"|"code", "message"}}` (OpenAI, Anthropic,
    /// Gemini, OpenRouter), `{"error": "..."}` (Ollama), and the Responses stream's
    /// `{"type": "error", "code", "message"}`.
    fn error(&mut self, v: &Value) {
        let described = match v.get("error") {
            Some(Value::String(message)) if !message.is_empty() => Some(clip(message)),
            Some(error @ Value::Object(_)) => describe_error(error, &["type", "status", "code"]),
            _ if str_at(v, "type") == Some("error") => describe_error(v, &["code"]),
            _ => None,
        };
        if described.is_some() {
            self.summary.error = described;
        }
    }

    fn text(&mut self, text: Option<&Value>) {
        if let Some(text) = text.and_then(Value::as_str) {
            self.summary.output_text_bytes += text.len() as u64;
        }
    }
}

/// "kind: message", from the first kind key present; None when neither is there.
fn describe_error(error: &Value, kind_keys: &[&str]) -> Option<String> {
    let kind = kind_keys.iter().find_map(|key| match error.get(key)? {
        Value::String(kind) if !kind.is_empty() => Some(kind.clone()),
        Value::Number(code) => Some(code.to_string()),
        _ => None,
    });
    let message = str_at(error, "message").filter(|m| !m.is_empty());
    let text = match (kind, message) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        (Some(kind), None) => kind,
        (None, Some(message)) => message.to_owned(),
        (None, None) => return None,
    };
    Some(clip(&text))
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Overwrite with a non-empty string; absent, null and empty values keep what is there
/// (Azure's first chunk names no model, finish reasons are null until the end).
fn set_str(slot: &mut Option<String>, value: Option<&Value>) {
    if let Some(text) = value.and_then(Value::as_str).filter(|t| !t.is_empty()) {
        *slot = Some(clip(text));
    }
}

fn set_count(slot: &mut Option<u64>, value: Option<&Value>) {
    if let Some(count) = value.and_then(Value::as_u64) {
        *slot = Some(count);
    }
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}
