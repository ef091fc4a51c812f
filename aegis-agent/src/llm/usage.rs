//! What a response says: model, token usage, finish reason, error; from a JSON body, SSE
//! events, or NDJSON lines.
//!
//! One [`UsageCollector`] per response, fed whichever form the body takes. Every document
//! is read the way its API ([`ApiKind`]) writes it; later values overwrite earlier ones
//! field by field, so a stream's final usage wins while a field it omits (Anthropic's
//! `message_delta` has no input count) keeps its earlier value. A document that does not
//! parse is counted in [`ResponseSummary::unparsed`], never fatal: a truncated body simply
//! yields fewer fields.
//!
//! For the rules ([`UsageCollector::capture_text`]) it keeps every text the model produced:
//! the generated text, and also tool-call arguments, refusals and reasoning, which carry
//! the model's output as much as the text does (only the generated text counts in
//! [`ResponseSummary::output_text_bytes`]). A document that is not JSON is kept whole as
//! text ([`UsageCollector::raw_documents`]), so that nothing of a response that does not
//! have its API's shape (plain text, JSON cut short) escapes the rules.

use super::{detect::ApiKind, json::Json};
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
    /// Generated text not yet taken by [`UsageCollector::take_text`], when capturing.
    text: Option<String>,
    /// Bytes of text held at most between two takes; the rest is counted, not kept.
    text_cap: usize,
    /// Generated text bytes not kept because of `text_cap`.
    pub text_dropped: u64,
    /// Documents (the body, SSE events, NDJSON lines) that were not JSON, kept as text.
    pub raw_documents: u64,
}

impl UsageCollector {
    pub fn new(api: ApiKind) -> Self {
        Self { api, summary: ResponseSummary::default(), text: None, text_cap: 0, text_dropped: 0, raw_documents: 0 }
    }

    /// Also keep the generated text (for rules), at most `cap` bytes between takes.
    pub fn capture_text(mut self, cap: usize) -> Self {
        self.text = Some(String::new());
        self.text_cap = cap;
        self
    }

    /// The generated text seen since the last take.
    pub fn take_text(&mut self) -> String {
        self.text.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// A complete (decoded, possibly truncated) non-streamed JSON body.
    pub fn on_body(&mut self, body: &[u8]) {
        match self.parse(body) {
            // Gemini `:streamGenerateContent` without `alt=sse`: an array of responses.
            Some(Json::Array(items)) => items.iter().for_each(|item| self.absorb(item)),
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

    /// None for a blank document (keep-alives, empty bodies) and, counted, for invalid JSON,
    /// whose text is then kept whole for the rules. Parsed as a [`Json`] (strings borrowed
    /// from `bytes`, objects as lists): a `serde_json::Value` of each response body was most
    /// of this collector's time (allocations and tree inserts), under `cargo xtask bench
    /// capture`'s profile.
    fn parse<'a>(&mut self, bytes: &'a [u8]) -> Option<Json<'a>> {
        if bytes.trim_ascii().is_empty() {
            return None;
        }
        let parsed = Json::parse(bytes).ok();
        if parsed.is_none() {
            self.summary.unparsed += 1;
            self.raw_documents += 1;
            self.keep(&String::from_utf8_lossy(bytes));
        }
        parsed
    }

    fn absorb(&mut self, v: &Json) {
        self.error(v);
        match self.api {
            ApiKind::ChatCompletions | ApiKind::Completions | ApiKind::Embeddings => self.openai(v),
            ApiKind::Responses => self.responses(v),
            ApiKind::AnthropicMessages => self.anthropic(v),
            ApiKind::GeminiGenerateContent => self.gemini(v),
            ApiKind::OllamaChat | ApiKind::OllamaGenerate => self.ollama(v),
            // Read as a whole for the rules: nothing says which fields are the output.
            ApiKind::Unknown => self.keep(&v.to_value().to_string()),
        }
    }

    /// Chat completion (or chunk), text completion, or embeddings list.
    fn openai(&mut self, v: &Json) {
        let s = &mut self.summary;
        set_str(&mut s.model, v.get("model"));
        set_str(&mut s.response_id, v.get("id"));
        // Null in every chunk but the last of its choice.
        set_str(&mut s.finish_reason, v.pointer("/choices/0/finish_reason"));
        for choice in items(v, "/choices") {
            let text = choice.pointer("/message/content").or_else(|| choice.pointer("/delta/content"));
            self.text(text.or_else(|| choice.get("text")));
            for part in ["/message", "/delta"].into_iter().filter_map(|p| choice.pointer(p)) {
                self.other_output(part.get("refusal"));
                self.other_output(part.get("reasoning_content"));
                self.other_output(part.pointer("/function_call/arguments"));
                for call in items(part, "/tool_calls") {
                    self.other_output(call.pointer("/function/arguments"));
                }
            }
        }
        self.usage(v.get("usage"));
    }

    /// Responses API: the response object, or a stream event that carries one or a delta.
    fn responses(&mut self, v: &Json) {
        match (v.get("response"), str_at(v, "/type")) {
            // response.created / in_progress / completed / failed / incomplete: the deltas
            // already carried the text.
            (Some(response), _) => {
                self.error(response);
                self.response_object(response, false);
            }
            (None, Some("response.output_text.delta")) => self.text(v.get("delta")),
            (None, Some(t)) if t.ends_with(".delta") => self.other_output(v.get("delta")),
            _ if str_at(v, "/object") == Some("response") => self.response_object(v, true),
            _ => {}
        }
    }

    fn response_object(&mut self, r: &Json, with_text: bool) {
        let s = &mut self.summary;
        set_str(&mut s.model, r.get("model"));
        set_str(&mut s.response_id, r.get("id"));
        set_str(&mut s.finish_reason, r.get("status"));
        if with_text {
            for item in items(r, "/output") {
                self.other_output(item.get("arguments"));
                for part in items(item, "/content").chain(items(item, "/summary")) {
                    match str_at(part, "/type") {
                        Some("output_text") => self.text(part.get("text")),
                        Some("refusal") => self.other_output(part.get("refusal")),
                        _ => self.other_output(part.get("text")),
                    }
                }
            }
        }
        self.usage(r.get("usage"));
    }

    /// Anthropic message, or one of its stream events.
    fn anthropic(&mut self, v: &Json) {
        match str_at(v, "/type") {
            Some("message") => self.anthropic_message(v, true),
            Some("message_start") => {
                if let Some(message) = v.get("message") {
                    self.anthropic_message(message, false);
                }
            }
            Some("message_delta") => {
                set_str(&mut self.summary.finish_reason, v.pointer("/delta/stop_reason"));
                self.usage(v.get("usage"));
            }
            Some("content_block_delta") => match str_at(v, "/delta/type") {
                Some("text_delta") => self.text(v.pointer("/delta/text")),
                Some("input_json_delta") => self.other_output(v.pointer("/delta/partial_json")),
                Some("thinking_delta") => self.other_output(v.pointer("/delta/thinking")),
                _ => {}
            },
            _ => {}
        }
    }

    fn anthropic_message(&mut self, m: &Json, with_text: bool) {
        let s = &mut self.summary;
        set_str(&mut s.model, m.get("model"));
        set_str(&mut s.response_id, m.get("id"));
        set_str(&mut s.finish_reason, m.get("stop_reason"));
        if with_text {
            for block in items(m, "/content") {
                match str_at(block, "/type") {
                    Some("text") => self.text(block.get("text")),
                    Some("tool_use") => self.other_output_json(block.get("input")),
                    Some("thinking") => self.other_output(block.get("thinking")),
                    _ => {}
                }
            }
        }
        self.usage(m.get("usage"));
    }

    /// Gemini GenerateContentResponse; a stream sends one per chunk with that chunk's text.
    fn gemini(&mut self, v: &Json) {
        let s = &mut self.summary;
        set_str(&mut s.model, v.get("modelVersion"));
        set_str(&mut s.response_id, v.get("responseId"));
        set_str(&mut s.finish_reason, v.pointer("/candidates/0/finishReason"));
        // A blocked prompt gets no candidates, only the reason.
        set_str(&mut s.finish_reason, v.pointer("/promptFeedback/blockReason"));
        if let Some(usage) = v.get("usageMetadata") {
            set_count(&mut s.input_tokens, usage.get("promptTokenCount"));
            set_count(&mut s.output_tokens, usage.get("candidatesTokenCount"));
            set_count(&mut s.cache_read_tokens, usage.get("cachedContentTokenCount"));
        }
        for candidate in items(v, "/candidates") {
            for part in items(candidate, "/content/parts") {
                if !matches!(part.get("thought"), Some(Json::Bool(true))) {
                    self.text(part.get("text"));
                } else {
                    self.other_output(part.get("text"));
                }
                self.other_output_json(part.pointer("/functionCall/args"));
            }
        }
    }

    /// Ollama native response, or one line of its stream (the last, `done: true`, has the
    /// counts).
    fn ollama(&mut self, v: &Json) {
        let s = &mut self.summary;
        set_str(&mut s.model, v.get("model"));
        set_str(&mut s.finish_reason, v.get("done_reason"));
        set_count(&mut s.input_tokens, v.get("prompt_eval_count"));
        set_count(&mut s.output_tokens, v.get("eval_count"));
        // /api/chat carries `message.content`, /api/generate `response`.
        self.text(v.pointer("/message/content").or_else(|| v.get("response")));
        self.other_output(v.pointer("/message/thinking").or_else(|| v.get("thinking")));
        for call in items(v, "/message/tool_calls") {
            self.other_output_json(call.pointer("/function/arguments"));
        }
    }

    /// A usage object, in either naming: `prompt_tokens`/`completion_tokens` (Chat
    /// Completions, embeddings) or `input_tokens`/`output_tokens` (Responses, Anthropic).
    fn usage(&mut self, usage: Option<&Json>) {
        let Some(u) = usage else { return };
        let s = &mut self.summary;
        set_count(&mut s.input_tokens, u.get("prompt_tokens").or_else(|| u.get("input_tokens")));
        set_count(&mut s.output_tokens, u.get("completion_tokens").or_else(|| u.get("output_tokens")));
        let cached = u.get("cache_read_input_tokens").or_else(|| u.pointer("/prompt_tokens_details/cached_tokens"));
        set_count(&mut s.cache_read_tokens, cached.or_else(|| u.pointer("/input_tokens_details/cached_tokens")));
        set_count(&mut s.cache_write_tokens, u.get("cache_creation_input_tokens"));
    }

    /// Error objects: `{"error": {"type"|"status"|"code", "message"}}` (OpenAI, Anthropic,
    /// Gemini, OpenRouter), `{"error": "..."}` (Ollama), and the Responses stream's
    /// `{"type": "error", "code", "message"}`.
    fn error(&mut self, v: &Json) {
        let described = match v.get("error") {
            Some(Json::String(message)) if !message.is_empty() => Some(clip(message)),
            Some(error @ Json::Object(_)) => describe_error(error, &["type", "status", "code"]),
            _ if str_at(v, "/type") == Some("error") => describe_error(v, &["code"]),
            _ => None,
        };
        if described.is_some() {
            self.summary.error = described;
        }
    }

    /// Generated text: counted in the summary and kept for the rules.
    fn text(&mut self, text: Option<&Json>) {
        if let Some(text) = text.and_then(Json::as_str) {
            self.summary.output_text_bytes += text.len() as u64;
            self.keep(text);
        }
    }

    /// Other output of the model (tool-call arguments, refusals, reasoning): for the rules.
    fn other_output(&mut self, text: Option<&Json>) {
        if let Some(text) = text.and_then(Json::as_str).filter(|t| !t.is_empty()) {
            self.keep(text);
        }
    }

    /// Structured output (tool-call arguments as an object): its JSON text, for the rules.
    fn other_output_json(&mut self, value: Option<&Json>) {
        match value {
            Some(Json::String(_)) => self.other_output(value),
            Some(v @ (Json::Object(_) | Json::Array(_))) => self.keep(&v.to_value().to_string()),
            _ => {}
        }
    }

    /// Keep `text` for the rules (when capturing), within the cap; count what did not fit.
    fn keep(&mut self, text: &str) {
        if let Some(kept) = &mut self.text {
            // Pieces are joined as they come: stream deltas split words (and secrets).
            let room = self.text_cap.saturating_sub(kept.len());
            let take = text.floor_char_boundary(room.min(text.len()));
            kept.push_str(&text[..take]);
            self.text_dropped += (text.len() - take) as u64;
        }
    }
}

/// "kind: message", from the first kind key present; None when neither is there.
fn describe_error(error: &Json, kind_keys: &[&str]) -> Option<String> {
    let kind = kind_keys.iter().find_map(|key| match error.get(key)? {
        Json::String(kind) if !kind.is_empty() => Some(kind.to_string()),
        Json::Number(code) => Some(code.to_string()),
        _ => None,
    });
    let message = str_at(error, "/message").filter(|m| !m.is_empty());
    let text = match (kind, message) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        (Some(kind), None) => kind,
        (None, Some(message)) => message.to_owned(),
        (None, None) => return None,
    };
    Some(clip(&text))
}

fn str_at<'a>(v: &'a Json, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Json::as_str)
}

/// The items of the array at `pointer`; none when absent or not an array.
fn items<'a, 'j>(v: &'a Json<'j>, pointer: &str) -> std::slice::Iter<'a, Json<'j>> {
    v.pointer(pointer).and_then(Json::as_array).unwrap_or_default().iter()
}

/// Overwrite with a non-empty string; absent, null and empty values keep what is there
/// (Azure's first chunk names no model, finish reasons are null until the end).
fn set_str(slot: &mut Option<String>, value: Option<&Json>) {
    if let Some(text) = value.and_then(Json::as_str).filter(|t| !t.is_empty()) {
        *slot = Some(clip(text));
    }
}

fn set_count(slot: &mut Option<u64>, value: Option<&Json>) {
    if let Some(count) = value.and_then(Json::as_u64) {
        *slot = Some(count);
    }
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(api: ApiKind, body: &str) -> ResponseSummary {
        let mut collector = UsageCollector::new(api);
        collector.on_body(body.as_bytes());
        collector.summary().clone()
    }

    /// Events as `(event name, data)`; an empty name means no `event:` field.
    fn sse(api: ApiKind, events: &[(&str, &str)]) -> ResponseSummary {
        let mut collector = UsageCollector::new(api);
        for (event, data) in events {
            let event = (!event.is_empty()).then(|| event.to_string());
            collector.on_sse(&SseEvent { event, data: data.to_string() });
        }
        collector.summary().clone()
    }

    fn lines(api: ApiKind, text: &str) -> ResponseSummary {
        let mut collector = UsageCollector::new(api);
        text.split('\n').for_each(|line| collector.on_json_line(line.as_bytes()));
        collector.summary().clone()
    }

    fn some(text: &str) -> Option<String> {
        Some(text.to_owned())
    }

    #[test]
    fn openai_chat_body() {
        let summary = body(
            ApiKind::ChatCompletions,
            r#"{
              "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
              "object": "chat.completion",
              "created": 1741569952,
              "model": "gpt-4.1-2025-04-14",
              "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I assist you today?", "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": "stop"
              }],
              "usage": {
                "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 12, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}
              },
              "service_tier": "default"
            }"#,
        );
        let expected = ResponseSummary {
            model: some("gpt-4.1-2025-04-14"),
            input_tokens: Some(19),
            output_tokens: Some(10),
            cache_read_tokens: Some(12),
            finish_reason: some("stop"),
            response_id: some("chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"),
            output_text_bytes: 34,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    #[test]
    fn openai_completions_and_embeddings_bodies() {
        let summary = body(
            ApiKind::Completions,
            r#"{"id":"cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7","object":"text_completion","created":1589478378,
                "model":"gpt-3.5-turbo-instruct","choices":[{"text":"\n\nThis is indeed a test","index":0,
                "logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        );
        assert_eq!(
            (summary.input_tokens, summary.output_tokens, summary.finish_reason.as_deref()),
            (Some(5), Some(7), Some("length"))
        );
        assert_eq!(summary.output_text_bytes, 23);

        let summary = body(
            ApiKind::Embeddings,
            r#"{"object":"list","data":[{"object":"embedding","embedding":[0.0023064255,-0.009327292],"index":0}],
                "model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        let expected = ResponseSummary {
            model: some("text-embedding-3-small"),
            input_tokens: Some(8),
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    const CHUNK: &str = r#""object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb""#;

    fn chunk(id: &str, rest: &str) -> String {
        format!(r#"{{"id":"{id}",{CHUNK},{rest}}}"#)
    }

    #[test]
    fn openai_chat_stream_with_usage() {
        let events = [
            // Azure's content-filter preamble names no model or id.
            r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#.to_owned(),
            chunk("chatcmpl-123", r#""choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null"#),
            chunk("chatcmpl-123", r#""choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null"#),
            chunk("chatcmpl-123", r#""choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":null}],"usage":null"#),
            chunk("chatcmpl-123", r#""choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null"#),
            chunk("chatcmpl-123", r#""choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}"#),
            "[DONE]".to_owned(),
        ];
        let events: Vec<_> = events.iter().map(|data| ("", data.as_str())).collect();
        let expected = ResponseSummary {
            model: some("gpt-4o-mini-2024-07-18"),
            input_tokens: Some(9),
            output_tokens: Some(2),
            finish_reason: some("stop"),
            response_id: some("chatcmpl-123"),
            output_text_bytes: 11,
            stream_events: 7,
            ..ResponseSummary::default()
        };
        assert_eq!(sse(ApiKind::ChatCompletions, &events), expected);
    }

    #[test]
    fn openai_chat_stream_without_usage() {
        let events = [
            chunk(
                "chatcmpl-9",
                r#""choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]"#,
            ),
            chunk(
                "chatcmpl-9",
                r#""choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":\"Paris\"}"}}]},"finish_reason":null}]"#,
            ),
            chunk("chatcmpl-9", r#""choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]"#),
            "[DONE]".to_owned(),
        ];
        let events: Vec<_> = events.iter().map(|data| ("", data.as_str())).collect();
        let summary = sse(ApiKind::ChatCompletions, &events);
        assert_eq!((summary.input_tokens, summary.output_tokens), (None, None));
        assert_eq!(summary.finish_reason.as_deref(), Some("tool_calls"));
        // Tool-call arguments are not generated text.
        assert_eq!((summary.output_text_bytes, summary.stream_events, summary.unparsed), (0, 4, 0));
    }

    #[test]
    fn responses_body() {
        let summary = body(
            ApiKind::Responses,
            r#"{
              "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
              "object": "response",
              "created_at": 1741476542,
              "status": "completed",
              "error": null,
              "incomplete_details": null,
              "model": "gpt-4.1-2025-04-14",
              "output": [
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Thinking"}]},
                {"type": "message", "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "In a peaceful grove beneath a silver moon...", "annotations": []}]}
              ],
              "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 4},
                        "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123}
            }"#,
        );
        let expected = ResponseSummary {
            model: some("gpt-4.1-2025-04-14"),
            input_tokens: Some(36),
            output_tokens: Some(87),
            cache_read_tokens: Some(4),
            finish_reason: some("completed"),
            response_id: some("resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"),
            output_text_bytes: 44,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    #[test]
    fn responses_stream() {
        let summary = sse(
            ApiKind::Responses,
            &[
                (
                    "response.created",
                    r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9","object":"response","created_at":1741290958,"status":"in_progress","error":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}"#,
                ),
                (
                    "response.output_item.added",
                    r#"{"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_1","status":"in_progress","type":"message","role":"assistant","content":[]}}"#,
                ),
                (
                    "response.output_text.delta",
                    r#"{"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
                ),
                (
                    "response.output_text.delta",
                    r#"{"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_1","output_index":0,"content_index":0,"delta":" there!"}"#,
                ),
                (
                    "response.output_text.done",
                    r#"{"type":"response.output_text.done","sequence_number":6,"item_id":"msg_1","output_index":0,"content_index":0,"text":"Hi there!"}"#,
                ),
                (
                    "response.completed",
                    r#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_67c9","object":"response","status":"completed","error":null,"model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}}}"#,
                ),
            ],
        );
        let expected = ResponseSummary {
            model: some("gpt-4.1-2025-04-14"),
            input_tokens: Some(37),
            output_tokens: Some(11),
            cache_read_tokens: Some(0),
            finish_reason: some("completed"),
            response_id: some("resp_67c9"),
            output_text_bytes: 9,
            stream_events: 6,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    #[test]
    fn responses_stream_failures() {
        let failed = sse(
            ApiKind::Responses,
            &[(
                "response.failed",
                r#"{"type":"response.failed","sequence_number":3,"response":{"id":"resp_1","object":"response","status":"failed","error":{"code":"server_error","message":"The model failed to generate a response."},"model":"gpt-4.1","usage":null}}"#,
            )],
        );
        assert_eq!(failed.error.as_deref(), Some("server_error: The model failed to generate a response."));
        assert_eq!(failed.finish_reason.as_deref(), Some("failed"));
        let error = sse(
            ApiKind::Responses,
            &[(
                "error",
                r#"{"type":"error","code":"ERR_SOMETHING","message":"Something went wrong","param":null,"sequence_number":1}"#,
            )],
        );
        assert_eq!(error.error.as_deref(), Some("ERR_SOMETHING: Something went wrong"));
    }

    #[test]
    fn anthropic_body_with_cache() {
        let summary = body(
            ApiKind::AnthropicMessages,
            r#"{
              "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
              "type": "message",
              "role": "assistant",
              "model": "claude-sonnet-4-5-20250929",
              "content": [
                {"type": "thinking", "thinking": "The user greets me.", "signature": "EqQB"},
                {"type": "text", "text": "Hello!"},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
              ],
              "stop_reason": "tool_use",
              "stop_sequence": null,
              "usage": {"input_tokens": 2095, "cache_creation_input_tokens": 1024, "cache_read_input_tokens": 4096,
                        "output_tokens": 503, "service_tier": "standard"}
            }"#,
        );
        let expected = ResponseSummary {
            model: some("claude-sonnet-4-5-20250929"),
            input_tokens: Some(2095),
            output_tokens: Some(503),
            cache_read_tokens: Some(4096),
            cache_write_tokens: Some(1024),
            finish_reason: some("tool_use"),
            response_id: some("msg_01XFDUDYJgAACzvnptvVoYEL"),
            output_text_bytes: 6,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    const ANTHROPIC_START: (&str, &str) = (
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
    );

    #[test]
    fn anthropic_stream() {
        let summary = sse(
            ApiKind::AnthropicMessages,
            &[
                ANTHROPIC_START,
                (
                    "content_block_start",
                    r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                ),
                ("ping", r#"{"type": "ping"}"#),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}"#,
                ),
                ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}"#,
                ),
                (
                    "message_delta",
                    r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
                ),
                ("message_stop", r#"{"type":"message_stop"}"#),
            ],
        );
        let expected = ResponseSummary {
            model: some("claude-sonnet-4-5-20250929"),
            input_tokens: Some(25),
            output_tokens: Some(15),
            cache_read_tokens: Some(0),
            cache_write_tokens: Some(0),
            finish_reason: some("end_turn"),
            response_id: some("msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"),
            output_text_bytes: 6,
            stream_events: 9,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    #[test]
    fn anthropic_stream_error() {
        let summary = sse(
            ApiKind::AnthropicMessages,
            &[
                ANTHROPIC_START,
                ("error", r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#),
            ],
        );
        assert_eq!(summary.error.as_deref(), Some("overloaded_error: Overloaded"));
        assert_eq!((summary.input_tokens, summary.output_tokens), (Some(25), Some(1)));
    }

    const GEMINI_FIRST: &str = r#"{"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 9,"totalTokenCount": 9},"modelVersion": "gemini-2.0-flash","responseId": "mjMfaNzRM6OVz7IPk4GM-Qo"}"#;
    const GEMINI_LAST: &str = r#"{"candidates": [{"content": {"parts": [{"text": " sky is blue."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 9,"candidatesTokenCount": 5,"totalTokenCount": 14,"cachedContentTokenCount": 2},"modelVersion": "gemini-2.0-flash","responseId": "mjMfaNzRM6OVz7IPk4GM-Qo"}"#;

    fn gemini_expected(stream_events: u64) -> ResponseSummary {
        ResponseSummary {
            model: some("gemini-2.0-flash"),
            input_tokens: Some(9),
            output_tokens: Some(5),
            cache_read_tokens: Some(2),
            finish_reason: some("STOP"),
            response_id: some("mjMfaNzRM6OVz7IPk4GM-Qo"),
            output_text_bytes: 16,
            stream_events,
            ..ResponseSummary::default()
        }
    }

    #[test]
    fn gemini_body() {
        let summary = body(
            ApiKind::GeminiGenerateContent,
            r#"{"candidates":[{"content":{"parts":[{"text":"Let me think.","thought":true},{"text":"AI learns patterns."}],"role":"model"},
                "finishReason":"MAX_TOKENS","avgLogprobs":-0.12,"index":0}],
                "usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":7,"totalTokenCount":31,"thoughtsTokenCount":20,
                "promptTokensDetails":[{"modality":"TEXT","tokenCount":4}]},
                "modelVersion":"gemini-2.5-flash","responseId":"abc123"}"#,
        );
        let expected = ResponseSummary {
            model: some("gemini-2.5-flash"),
            input_tokens: Some(4),
            output_tokens: Some(7),
            finish_reason: some("MAX_TOKENS"),
            response_id: some("abc123"),
            output_text_bytes: 19,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);
    }

    #[test]
    fn gemini_streams_as_sse_and_as_json_array() {
        let summary = sse(ApiKind::GeminiGenerateContent, &[("", GEMINI_FIRST), ("", GEMINI_LAST)]);
        assert_eq!(summary, gemini_expected(2));
        let array = format!("[{GEMINI_FIRST},\r\n{GEMINI_LAST}]");
        assert_eq!(body(ApiKind::GeminiGenerateContent, &array), gemini_expected(0));
        // Without the last chunk: input known, output not.
        let summary = sse(ApiKind::GeminiGenerateContent, &[("", GEMINI_FIRST)]);
        assert_eq!((summary.input_tokens, summary.output_tokens, summary.finish_reason), (Some(9), None, None));
    }

    #[test]
    fn gemini_blocked_prompt() {
        let summary = body(
            ApiKind::GeminiGenerateContent,
            r#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[{"category":"HARM_CATEGORY_DANGEROUS_CONTENT","probability":"HIGH"}]},
                "usageMetadata":{"promptTokenCount":8,"totalTokenCount":8},"modelVersion":"gemini-2.0-flash"}"#,
        );
        assert_eq!(summary.finish_reason.as_deref(), Some("SAFETY"));
        assert_eq!((summary.input_tokens, summary.output_tokens), (Some(8), None));
    }

    #[test]
    fn ollama_body_and_streams() {
        let summary = body(
            ApiKind::OllamaChat,
            r#"{"model":"llama3.2","created_at":"2023-12-12T14:13:43.416799Z","message":{"role":"assistant","content":"Hello! How are you today?"},
                "done":true,"done_reason":"stop","total_duration":5191566416,"load_duration":2154458,"prompt_eval_count":26,
                "prompt_eval_duration":383809000,"eval_count":298,"eval_duration":4799921000}"#,
        );
        let expected = ResponseSummary {
            model: some("llama3.2"),
            input_tokens: Some(26),
            output_tokens: Some(298),
            finish_reason: some("stop"),
            output_text_bytes: 25,
            ..ResponseSummary::default()
        };
        assert_eq!(summary, expected);

        let chat = concat!(
            r#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","message":{"role":"assistant","content":"The"},"done":false}"#,
            "\n",
            r#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.5-07:00","message":{"role":"assistant","content":" sky"},"done":false}"#,
            "\n",
            r#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}"#,
            "\n\n",
        );
        let expected = ResponseSummary {
            model: some("llama3.2"),
            input_tokens: Some(26),
            output_tokens: Some(282),
            finish_reason: some("stop"),
            output_text_bytes: 7,
            stream_events: 3,
            ..ResponseSummary::default()
        };
        assert_eq!(lines(ApiKind::OllamaChat, chat), expected);

        let generate = concat!(
            r#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","response":"The","done":false}"#,
            "\r\n",
            r#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"","done":true,"done_reason":"length","context":[1,2,3],"total_duration":10706818083,"prompt_eval_count":26,"eval_count":259}"#,
        );
        let summary = lines(ApiKind::OllamaGenerate, generate);
        assert_eq!((summary.input_tokens, summary.output_tokens), (Some(26), Some(259)));
        assert_eq!((summary.finish_reason.as_deref(), summary.output_text_bytes), (Some("length"), 3));
        // Interrupted before the final line: no counts.
        let first_line = chat.split('\n').next().unwrap();
        assert_eq!(lines(ApiKind::OllamaChat, first_line).output_tokens, None);
    }

    #[test]
    fn error_bodies() {
        let openai = body(
            ApiKind::ChatCompletions,
            r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        );
        let expected = "invalid_request_error: The model `gpt-9` does not exist or you do not have access to it.";
        assert_eq!(openai.error.as_deref(), Some(expected));
        assert_eq!((openai.model, openai.input_tokens), (None, None));

        let anthropic = body(
            ApiKind::AnthropicMessages,
            r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-x"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#,
        );
        assert_eq!(anthropic.error.as_deref(), Some("not_found_error: model: claude-x"));

        let gemini = body(
            ApiKind::GeminiGenerateContent,
            r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT",
                "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#,
        );
        assert_eq!(gemini.error.as_deref(), Some("INVALID_ARGUMENT: API key not valid. Please pass a valid API key."));

        // Null type: the code names it. OpenRouter: a numeric code.
        let rate = body(
            ApiKind::ChatCompletions,
            r#"{"error":{"message":"Rate limit reached","type":null,"code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(rate.error.as_deref(), Some("rate_limit_exceeded: Rate limit reached"));
        let openrouter = body(ApiKind::ChatCompletions, r#"{"error":{"code":402,"message":"Insufficient credits"}}"#);
        assert_eq!(openrouter.error.as_deref(), Some("402: Insufficient credits"));

        let ollama = body(ApiKind::OllamaChat, r#"{"error":"model \"llama9\" not found, try pulling it first"}"#);
        assert_eq!(ollama.error.as_deref(), Some(r#"model "llama9" not found, try pulling it first"#));
        assert_eq!(body(ApiKind::ChatCompletions, r#"{"error":{}}"#).error, None);
    }

    #[test]
    fn long_error_is_clipped_on_a_char_boundary() {
        let message = "é".repeat(300);
        let summary =
            body(ApiKind::ChatCompletions, &format!(r#"{{"error":{{"type":"server_error","message":"{message}"}}}}"#));
        let error = summary.error.unwrap();
        assert_eq!(error.chars().count(), MAX_TEXT_CHARS);
        assert!(error.starts_with("server_error: éé"));
    }

    #[test]
    fn unparsable_documents_are_counted() {
        let mut collector = UsageCollector::new(ApiKind::ChatCompletions);
        // Truncated body, invalid UTF-8, SSE keep-alive with empty data, blank NDJSON line.
        collector.on_body(br#"{"id":"chatcmpl-1","model":"gpt-4o","choices":[{"message":{"content":"Hel"#);
        collector.on_body(b"{\"model\":\"\xff\xfe\"}");
        collector.on_body(b"");
        collector.on_sse(&SseEvent { event: None, data: String::new() });
        collector.on_sse(&SseEvent { event: None, data: "{not json".to_owned() });
        collector.on_json_line(b"  \r");
        collector.on_sse(&SseEvent { event: None, data: chunk("chatcmpl-2", r#""choices":[]"#) });
        let expected = ResponseSummary {
            model: some("gpt-4o-mini-2024-07-18"),
            response_id: some("chatcmpl-2"),
            stream_events: 3,
            unparsed: 3,
            ..ResponseSummary::default()
        };
        assert_eq!(collector.summary(), &expected);
    }

    #[test]
    fn non_object_documents_are_ignored() {
        let summary = sse(ApiKind::ChatCompletions, &[("", "42"), ("", r#""text""#), ("", "[[1]]"), ("", "null")]);
        assert_eq!(summary, ResponseSummary { stream_events: 4, ..ResponseSummary::default() });
    }
}
