//! Which model API a request is, from its method, path and body shape, not only its
//! host name, so local and self-hosted endpoints (vLLM, Ollama, LiteLLM, gateways) count.
//!
//! Recognition, in order:
//!
//! 1. Only `POST` with a body that starts as a JSON object can be a call; token-counting
//!    endpoints (`/v1/messages/count_tokens`, `:countTokens`) take a call's exact body but
//!    are not calls.
//! 2. A known path shape names the API (`…/chat/completions`, `…/v1/messages`,
//!    `…/models/{model}:generateContent`, `…/api/chat`, ...); the body must then have
//!    that API's required field (`messages`, `prompt`, `input`, `contents`).
//! 3. Any other path counts only when the body looks like a chat call: a string `model`
//!    and a non-empty `messages` array of objects with a `role`. That is read as
//!    OpenAI-compatible chat, the shape most gateways speak.
//!
//! A body that was truncated, or is too large to parse, is scanned textually for `model`
//! and `stream` in its first 64 KiB; only the path can then recognise the call.
//!
//! Capture can lose a request's head (too large to read, cut by a gap) or all of a
//! request: [`detect_unparsed`] judges a request from its start line alone, and
//! [`response_api`] recognises a model API's response from its own shape, so that a call
//! whose request was not seen is still reported.
//!
//! The provider comes from the host when it is a known service, else from the API shape.

use std::fmt;

use memchr::memmem;
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;

/// The API spoken, independent of who serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKind {
    /// OpenAI-compatible `POST /v1/chat/completions` (also vLLM, Ollama /v1, LiteLLM, OpenRouter).
    ChatCompletions,
    /// OpenAI-compatible `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// OpenAI-compatible `POST /v1/embeddings`.
    Embeddings,
    /// Anthropic `POST /v1/messages` (also Claude on Vertex AI: `…/publishers/anthropic/
    /// models/{model}:rawPredict` and `:streamRawPredict`, which take the same body).
    AnthropicMessages,
    /// Gemini `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
    GeminiGenerateContent,
    /// Ollama native `POST /api/chat`.
    OllamaChat,
    /// Ollama native `POST /api/generate`.
    OllamaGenerate,
    /// Not known: the request was not read (its head could not be parsed) and its response
    /// did not show which API it is. Never given on the command line.
    #[serde(skip_deserializing)]
    Unknown,
}

/// What the request says about the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub api: ApiKind,
    /// Who serves it: "openai", "anthropic", "gemini", "openrouter", "ollama", ... from the
    /// host when known; otherwise from the API shape ("openai_compatible", "anthropic",
    /// "gemini", "ollama").
    pub provider: &'static str,
    /// Requested model: from the body, else from the path (Gemini and Vertex AI model,
    /// Azure deployment). None when unknown, e.g. past the scanned head of a cut body.
    pub model: Option<String>,
    /// Streaming requested: `"stream": true`, a streaming path (`:streamGenerateContent`,
    /// `:streamRawPredict`), or Ollama native without `"stream": false`.
    pub stream: bool,
}

/// The parts of a request that detection looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Request target as sent (path and query).
    pub target: &'a str,
    /// Host header (may carry a port).
    pub host: Option<&'a str>,
    pub content_type: Option<&'a [u8]>,
    /// Decoded request body (possibly truncated at the agent's cap).
    pub body: &'a [u8],
    /// True when `body` is shorter than what was sent.
    pub body_truncated: bool,
}

/// Bodies up to this size are parsed; larger ones are only scanned, like truncated ones.
const MAX_PARSE_BYTES: usize = 8 << 20;
/// How much of an unparsable (truncated or oversized) body the textual scan reads.
const SCAN_BYTES: usize = 64 << 10;
/// A longer "model" value is not a model name; it is dropped rather than recorded.
const MAX_MODEL_BYTES: usize = 256;

/// Cheap head-only prefilter: false means this request is surely not a model API call,
/// so its body need not be kept. Unknown paths pass: the body-shape fallback may still
/// recognise them.
pub fn may_be_api_call(method: &str, target: &str) -> bool {
    method == "POST" && !is_token_count(path_of(target))
}

/// Recognise a model API call. None: not one (the exchange is ignored).
pub fn detect(req: &RequestView<'_>) -> Option<ApiCall> {
    if req.method != "POST" {
        return None;
    }
    let path = path_of(req.target);
    if is_token_count(path) || req.body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let parsable = !req.body_truncated && req.body.len() <= MAX_PARSE_BYTES;
    let (api, model, stream) = match route(path) {
        Some(route) if parsable => {
            let probe = Probe::parse(req.body)?;
            if !route.accepts(&probe) {
                return None;
            }
            (route.api, probe.model.or_else(|| route.model()), route.stream(probe.stream))
        }
        Some(route) => {
            let model = scan(req.body, b"\"model\"", read_string).or_else(|| route.model());
            (route.api, model, route.stream(scan(req.body, b"\"stream\"", read_bool)))
        }
        None if parsable => {
            // Most JSON POSTs are not model calls: skip the parse when the key is absent.
            memmem::find(req.body, b"\"messages\"")?;
            let probe = Probe::parse(req.body)?;
            if probe.model.is_none() || !probe.is_chat() {
                return None;
            }
            (ApiKind::ChatCompletions, probe.model, probe.stream == Some(true))
        }
        None => return None,
    };
    Some(ApiCall { api, provider: provider(req.host, api), model, stream })
}

/// The path of a request target: absolute-form (sent to forward proxies) loses its scheme
/// and authority; query, fragment and trailing slashes go.
fn path_of(target: &str) -> &str {
    let target = match target.split_once("://") {
        Some((_, rest)) if !target.starts_with('/') => rest.find('/').map_or("", |i| &rest[i..]),
        _ => target,
    };
    let end = target.find(['?', '#']).unwrap_or(target.len());
    target[..end].trim_end_matches('/')
}

/// Token-counting endpoints take a model call's exact body but are not calls.
fn is_token_count(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or(path);
    last == "count_tokens" || last.ends_with(":countTokens") || last.starts_with("count-tokens:")
}

/// What the path says: the API, and what it carries instead of the body.
struct Route<'a> {
    api: ApiKind,
    /// Model named by the path (Gemini, Vertex AI) or Azure deployment name.
    path_model: Option<&'a str>,
    /// The path itself asks for a stream (`:streamGenerateContent`, `:streamRawPredict`).
    path_stream: bool,
}

fn route(path: &str) -> Option<Route<'_>> {
    let mut segments = path.rsplit('/');
    let last = segments.next()?;
    if let Some((model, action)) = last.split_once(':') {
        // `…/models/{model}:{action}` (Gemini API, Vertex AI publisher models).
        if segments.next() != Some("models") || model.is_empty() {
            return None;
        }
        let (api, path_stream) = match action {
            "generateContent" => (ApiKind::GeminiGenerateContent, false),
            "streamGenerateContent" => (ApiKind::GeminiGenerateContent, true),
            "rawPredict" if segments.next() == Some("anthropic") => (ApiKind::AnthropicMessages, false),
            "streamRawPredict" if segments.next() == Some("anthropic") => (ApiKind::AnthropicMessages, true),
            _ => return None,
        };
        return Some(Route { api, path_model: Some(model), path_stream });
    }
    let api = if path.ends_with("/chat/completions") {
        ApiKind::ChatCompletions
    } else if path.ends_with("/completions") {
        ApiKind::Completions
    } else if path.ends_with("/responses") {
        ApiKind::Responses
    } else if path.ends_with("/embeddings") {
        ApiKind::Embeddings
    } else if path.ends_with("/v1/messages") {
        ApiKind::AnthropicMessages
    } else if path.ends_with("/api/chat") {
        ApiKind::OllamaChat
    } else if path.ends_with("/api/generate") {
        ApiKind::OllamaGenerate
    } else {
        return None;
    };
    // Azure `/openai/deployments/{deployment}/…`: the body may omit the model.
    let mut segments = path.split('/');
    let path_model = segments.find(|s| *s == "deployments").and_then(|_| segments.next());
    Some(Route { api, path_model, path_stream: false })
}

impl Route<'_> {
    /// Whether a parsed body has the fields this API requires.
    fn accepts(&self, probe: &Probe) -> bool {
        let messages = matches!(probe.messages, Some(Shape::Array { .. }));
        match self.api {
            ApiKind::ChatCompletions => messages,
            ApiKind::Completions => probe.prompt,
            // A stored prompt (`"prompt": {"id": …}`) may stand in for `input`.
            ApiKind::Responses => probe.input || probe.prompt,
            ApiKind::Embeddings => probe.input,
            // Claude on Vertex AI names the model in the path only.
            ApiKind::AnthropicMessages => messages && (probe.model.is_some() || self.path_model.is_some()),
            ApiKind::GeminiGenerateContent => probe.contents,
            ApiKind::OllamaChat => messages && probe.model.is_some(),
            ApiKind::OllamaGenerate => probe.prompt && probe.model.is_some(),
            ApiKind::Unknown => false,
        }
    }

    fn model(&self) -> Option<String> {
        self.path_model.filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_BYTES).map(str::to_owned)
    }

    fn stream(&self, requested: Option<bool>) -> bool {
        match self.api {
            // Ollama native streams unless told not to.
            ApiKind::OllamaChat | ApiKind::OllamaGenerate => requested.unwrap_or(true),
            _ => self.path_stream || requested == Some(true),
        }
    }
}

/// A POST whose head could not be parsed past its start line (`method`, `target`, and
/// `host` if its field was read): a call
/// when its path names an API, or may be one on a path that does not ([`ApiKind::Unknown`]:
/// only the body would have told). None: surely not a call.
pub fn detect_unparsed(method: &str, target: &str, host: Option<&str>) -> Option<ApiCall> {
    if !may_be_api_call(method, target) {
        return None;
    }
    let path = path_of(target);
    let (api, model, stream) = match route(path) {
        Some(route) => (route.api, route.model(), route.stream(None)),
        None => (ApiKind::Unknown, None, false),
    };
    Some(ApiCall { api, provider: provider(host, api), model, stream })
}

/// Bytes of a response's decoded body that [`response_api`] needs at most.
pub const RESPONSE_SNIFF_BYTES: usize = 64 * 1024;

/// Which model API a response is from, by its own shape, and whether it streams; for a
/// response whose request was not seen. `body` is the start of the decoded body (up to
/// [`RESPONSE_SNIFF_BYTES`]). The first JSON document (the body, the first SSE `data:` or
/// NDJSON line) must carry an API's marks: OpenAI's `object` names (`chat.completion`,
/// `text_completion`, `response`, an embedding `list`) or `choices`; Anthropic's message
/// types; Gemini's `candidates`/`usageMetadata`; Ollama's `done` with `message` or
/// `response`. Anything else (an error object alone, other JSON, HTML) is not recognised.
pub fn response_api(content_type: Option<&[u8]>, body: &[u8]) -> Option<(ApiKind, bool)> {
    let content_type = String::from_utf8_lossy(content_type.unwrap_or_default()).to_ascii_lowercase();
    let body = body.trim_ascii_start();
    let sse = content_type.starts_with("text/event-stream");
    let (document, stream) = if sse {
        // The first `data:` field with a JSON object.
        let data = body.split(|&b| b == b'\n').find_map(|line| {
            let value = line.strip_prefix(b"data:")?.trim_ascii();
            value.starts_with(b"{").then_some(value)
        })?;
        (data, true)
    } else if content_type.contains("ndjson") || memchr::memchr(b'\n', body.trim_ascii_end()).is_some() {
        let first = body.split(|&b| b == b'\n').next().unwrap_or_default().trim_ascii();
        match serde_json::from_slice::<Value>(first) {
            Ok(_) if first.len() < body.trim_ascii_end().len() => (first, true),
            _ => (body, false),
        }
    } else {
        (body, false)
    };
    let value: Value = serde_json::from_slice(document).ok().or_else(|| {
        // A document longer than the sniffed bytes: only its top-level keys can tell.
        (document.first() == Some(&b'{')).then(|| textual_keys(document)).flatten()
    })?;
    let str_of = |key: &str| value.get(key).and_then(Value::as_str);
    let api = match (str_of("object"), str_of("type")) {
        (Some(o), _) if o.starts_with("chat.completion") => ApiKind::ChatCompletions,
        (Some("text_completion"), _) => ApiKind::Completions,
        (Some("response"), _) => ApiKind::Responses,
        (_, Some(t)) if t.starts_with("response.") => ApiKind::Responses,
        (Some("list"), _) if value.pointer("/data/0/embedding").is_some() => ApiKind::Embeddings,
        (_, Some("message" | "message_start" | "message_delta" | "message_stop" | "ping"))
        | (_, Some("content_block_start" | "content_block_delta" | "content_block_stop")) => ApiKind::AnthropicMessages,
        _ if value.get("choices").is_some() => ApiKind::ChatCompletions,
        _ if value.get("candidates").is_some() || value.get("usageMetadata").is_some() => {
            ApiKind::GeminiGenerateContent
        }
        _ if value.get("done").is_some_and(Value::is_boolean) && value.get("message").is_some() => ApiKind::OllamaChat,
        _ if value.get("done").is_some_and(Value::is_boolean) && value.get("response").is_some() => {
            ApiKind::OllamaGenerate
        }
        _ => return None,
    };
    Some((api, stream))
}

/// The top-level keys of a JSON object cut short, with the string values of `object` and
/// `type` (what [`response_api`] looks at), read textually: keys at nesting depth one.
fn textual_keys(document: &[u8]) -> Option<Value> {
    let mut map = serde_json::Map::new();
    let (mut depth, mut i) = (0usize, 0usize);
    while i < document.len() {
        match document[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                // A string cut short ends what can be read.
                let Some(len) = string_len(&document[i..]) else { break };
                let text = &document[i + 1..i + len - 1];
                let rest = document[i + len..].trim_ascii_start();
                if depth == 1 && rest.first() == Some(&b':') {
                    let key = String::from_utf8_lossy(text).into_owned();
                    let value = read_string(rest[1..].trim_ascii_start()).map_or(Value::Bool(true), Value::String);
                    map.entry(key).or_insert(value);
                }
                i += len;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    (!map.is_empty()).then_some(Value::Object(map))
}

/// Length of the JSON string literal at the start of `s`, quotes included.
fn string_len(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Who serves a call of `api` sent to `host`: the known service of the host, else the API's
/// shape.
pub fn provider(host: Option<&str>, api: ApiKind) -> &'static str {
    const HOSTS: &[(&str, &str)] = &[
        ("api.openai.com", "openai"),
        ("api.anthropic.com", "anthropic"),
        ("generativelanguage.googleapis.com", "gemini"),
        ("aiplatform.googleapis.com", "vertex_ai"),
        ("openrouter.ai", "openrouter"),
        ("api.groq.com", "groq"),
        ("api.mistral.ai", "mistral"),
        ("api.together.xyz", "together"),
        ("api.deepseek.com", "deepseek"),
        ("api.x.ai", "xai"),
        ("api.fireworks.ai", "fireworks"),
        ("api.cohere.com", "cohere"),
        ("api.cohere.ai", "cohere"),
    ];
    const SUFFIXES: &[(&str, &str)] = &[
        (".openai.azure.com", "azure_openai"),
        // Azure OpenAI resources created from AI Foundry.
        (".cognitiveservices.azure.com", "azure_openai"),
        // Regional Vertex AI endpoints: `{region}-aiplatform.googleapis.com`.
        ("-aiplatform.googleapis.com", "vertex_ai"),
    ];
    let (name, port) = host.map(crate::net::split_host).unwrap_or_default();
    let name = name.trim_end_matches('.').as_bytes();
    let known = HOSTS.iter().find(|(host, _)| name.eq_ignore_ascii_case(host.as_bytes())).or_else(|| {
        SUFFIXES.iter().find(|(suffix, _)| {
            name.len() > suffix.len() && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        })
    });
    match (known, api) {
        (Some((_, provider)), _) => provider,
        (None, ApiKind::Unknown) => "unknown",
        (None, ApiKind::OllamaChat | ApiKind::OllamaGenerate) => "ollama",
        // Ollama's default port, whatever API it is asked for.
        (None, _) if port == Some("11434") => "ollama",
        (None, ApiKind::AnthropicMessages) => "anthropic",
        (None, ApiKind::GeminiGenerateContent) => "gemini",
        (None, _) => "openai_compatible",
    }
}

/// First `"key": value` in the body's head whose value `read` accepts. Textual, so it may
/// find a nested key; good enough for a body that cannot be parsed.
fn scan<T>(body: &[u8], key: &[u8], read: fn(&[u8]) -> Option<T>) -> Option<T> {
    let head = &body[..body.len().min(SCAN_BYTES)];
    memmem::find_iter(head, key).find_map(|at| {
        // An escaped quote: the key is text inside a string.
        if at > 0 && head[at - 1] == b'\\' {
            return None;
        }
        let value = head[at + key.len()..].trim_ascii_start().strip_prefix(b":")?;
        read(value.trim_ascii_start())
    })
}

/// A short string literal without escapes (model names have none).
fn read_string(value: &[u8]) -> Option<String> {
    let value = value.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', &value[..value.len().min(MAX_MODEL_BYTES + 1)])?;
    let text = &value[..end];
    if text.is_empty() || text.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(text).ok().map(str::to_owned)
}

fn read_bool(value: &[u8]) -> Option<bool> {
    if value.starts_with(b"true") {
        Some(true)
    } else if value.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

/// The top-level fields detection needs. Deserialised straight from the bytes: other
/// values (the prompt text, mostly) are skipped without being copied.
#[derive(Default)]
struct Probe {
    /// A non-empty string of at most [`MAX_MODEL_BYTES`].
    model: Option<String>,
    /// A boolean `stream`.
    stream: Option<bool>,
    messages: Option<Shape>,
    prompt: bool,
    input: bool,
    contents: bool,
}

impl Probe {
    /// None when the body is not one well-formed JSON object. UTF-8 is checked up front:
    /// skipped values (the prompt) are not validated by the parser.
    fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_str(std::str::from_utf8(body).ok()?).ok()
    }

    /// `messages` is a non-empty array of objects with a `role`.
    fn is_chat(&self) -> bool {
        matches!(self.messages, Some(Shape::Array { items, with_role }) if items > 0 && with_role == items)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ProbeKey {
    Model,
    Stream,
    Messages,
    Prompt,
    Input,
    Contents,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProbeVisitor;
        impl<'de> Visitor<'de> for ProbeVisitor {
            type Value = Probe;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            // A repeated key overwrites, as in the servers' JSON parsers.
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
                let mut probe = Probe::default();
                while let Some(key) = map.next_key()? {
                    match key {
                        ProbeKey::Model => {
                            probe.model = match map.next_value()? {
                                Value::String(s) if !s.is_empty() && s.len() <= MAX_MODEL_BYTES => Some(s),
                                _ => None,
                            }
                        }
                        ProbeKey::Stream => probe.stream = map.next_value::<Value>()?.as_bool(),
                        ProbeKey::Messages => probe.messages = Some(map.next_value()?),
                        ProbeKey::Prompt => {
                            map.next_value::<IgnoredAny>()?;
                            probe.prompt = true;
                        }
                        ProbeKey::Input => {
                            map.next_value::<IgnoredAny>()?;
                            probe.input = true;
                        }
                        ProbeKey::Contents => {
                            map.next_value::<IgnoredAny>()?;
                            probe.contents = true;
                        }
                        ProbeKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(probe)
            }
        }
        deserializer.deserialize_map(ProbeVisitor)
    }
}

/// The shape of a `messages` value, its items' contents skipped.
enum Shape {
    Array { items: usize, with_role: usize },
    Object { role: bool },
    Scalar,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ShapeKey {
    Role,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShapeVisitor;
        impl<'de> Visitor<'de> for ShapeVisitor {
            type Value = Shape;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let (mut items, mut with_role) = (0, 0);
                while let Some(item) = seq.next_element()? {
                    items += 1;
                    with_role += usize::from(matches!(item, Shape::Object { role: true }));
                }
                Ok(Shape::Array { items, with_role })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
                let mut role = false;
                while let Some(key) = map.next_key()? {
                    role |= matches!(key, ShapeKey::Role);
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(Shape::Object { role })
            }

            fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
                Ok(Shape::Scalar)
            }

            fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
                Ok(Shape::Scalar)
            }

            fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
                Ok(Shape::Scalar)
            }

            fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::Scalar)
            }

            fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape::Scalar)
            }

            fn visit_unit<E>(self) -> Result<Shape, E> {
                Ok(Shape::Scalar)
            }
        }
        deserializer.deserialize_any(ShapeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(method: &'a str, target: &'a str, host: &'a str, body: &'a [u8]) -> RequestView<'a> {
        RequestView {
            method,
            target,
            host: Some(host),
            content_type: Some(b"application/json"),
            body,
            body_truncated: false,
        }
    }

    fn post(target: &str, host: &str, body: &str) -> Option<ApiCall> {
        detect(&request("POST", target, host, body.as_bytes()))
    }

    fn call(api: ApiKind, provider: &'static str, model: Option<&str>, stream: bool) -> Option<ApiCall> {
        Some(ApiCall { api, provider, model: model.map(str::to_owned), stream })
    }

    const CHAT: &str = r#"{
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}
        ],
        "temperature": 0.2,
        "stream": true,
        "stream_options": {"include_usage": true},
        "tools": [{"type": "function", "function": {"name": "lookup",
            "parameters": {"type": "object", "properties": {"model": {"type": "string"}}}}}]
    }"#;

    #[test]
    fn openai_chat_completions() {
        let expected = call(ApiKind::ChatCompletions, "openai", Some("gpt-4o-mini"), true);
        assert_eq!(post("/v1/chat/completions", "api.openai.com", CHAT), expected);
        let body = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"Hi"}],"stream":false}"#;
        let expected = call(ApiKind::ChatCompletions, "openai", Some("gpt-4.1"), false);
        assert_eq!(post("/v1/chat/completions", "api.openai.com", body), expected);
    }

    #[test]
    fn chat_completions_under_any_prefix() {
        let body = r#"{"model":"meta-llama/llama-3.1-8b-instruct","messages":[{"role":"user","content":"Hi"}]}"#;
        let openrouter = post("/api/v1/chat/completions", "openrouter.ai", body).unwrap();
        assert_eq!((openrouter.api, openrouter.provider), (ApiKind::ChatCompletions, "openrouter"));
        let gemini = post("/v1beta/openai/chat/completions", "generativelanguage.googleapis.com", body).unwrap();
        assert_eq!((gemini.api, gemini.provider), (ApiKind::ChatCompletions, "gemini"));
        let groq = post("/openai/v1/chat/completions", "api.groq.com", body).unwrap();
        assert_eq!((groq.api, groq.provider), (ApiKind::ChatCompletions, "groq"));
        // Trailing slash, and absolute-form through a forward proxy.
        assert_eq!(post("/v1/chat/completions/", "localhost:8000", body).unwrap().provider, "openai_compatible");
        let absolute = post("http://localhost:8000/v1/chat/completions?x=1", "localhost:8000", body).unwrap();
        assert_eq!(absolute.model.as_deref(), Some("meta-llama/llama-3.1-8b-instruct"));
    }

    #[test]
    fn azure_model_from_deployment_when_body_lacks_it() {
        let target = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21";
        let host = "contoso.openai.azure.com";
        let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":100}"#;
        let expected = call(ApiKind::ChatCompletions, "azure_openai", Some("gpt4o-prod"), false);
        assert_eq!(post(target, host, body), expected);
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#;
        assert_eq!(post(target, host, body).unwrap().model.as_deref(), Some("gpt-4o"));
        let target = "/openai/deployments/emb/embeddings?api-version=2024-10-21";
        let foundry = post(target, "res.cognitiveservices.azure.com", r#"{"input":"hello"}"#);
        assert_eq!(foundry, call(ApiKind::Embeddings, "azure_openai", Some("emb"), false));
    }

    #[test]
    fn chat_completions_needs_a_messages_array() {
        assert_eq!(post("/v1/chat/completions", "api.openai.com", r#"{"model":"gpt-4o"}"#), None);
        let body = r#"{"model":"gpt-4o","messages":"Hi"}"#;
        assert_eq!(post("/v1/chat/completions", "api.openai.com", body), None);
    }

    #[test]
    fn completions_responses_embeddings() {
        let body = r#"{"model":"gpt-3.5-turbo-instruct","prompt":["Say this is a test"],"max_tokens":7,"stream":true}"#;
        let expected = call(ApiKind::Completions, "openai", Some("gpt-3.5-turbo-instruct"), true);
        assert_eq!(post("/v1/completions", "api.openai.com", body), expected);
        assert_eq!(post("/v1/completions", "api.openai.com", r#"{"model":"davinci-002"}"#), None);

        let body = r#"{"model":"gpt-4.1","input":[{"role":"user","content":"Tell me a story"}],"stream":true}"#;
        let expected = call(ApiKind::Responses, "openai", Some("gpt-4.1"), true);
        assert_eq!(post("/v1/responses", "api.openai.com", body), expected);
        let body = r#"{"model":"gpt-5","prompt":{"id":"pmpt_abc123","variables":{"city":"Paris"}}}"#;
        assert_eq!(post("/v1/responses", "api.openai.com", body).unwrap().api, ApiKind::Responses);
        assert_eq!(post("/v1/responses", "api.openai.com", r#"{"model":"gpt-4.1"}"#), None);

        let body = r#"{"model":"text-embedding-3-small","input":["a","b"],"encoding_format":"float"}"#;
        let expected = call(ApiKind::Embeddings, "openai", Some("text-embedding-3-small"), false);
        assert_eq!(post("/v1/embeddings", "api.openai.com", body), expected);
        // Ollama's old native embeddings endpoint takes `prompt`, not `input`.
        assert_eq!(post("/api/embeddings", "localhost:11434", r#"{"model":"all-minilm","prompt":"x"}"#), None);
    }

    #[test]
    fn anthropic_messages() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":"Be brief.",
            "messages":[{"role":"user","content":"Hello, Claude"}],"stream":true}"#;
        let expected = call(ApiKind::AnthropicMessages, "anthropic", Some("claude-sonnet-4-5"), true);
        assert_eq!(post("/v1/messages", "api.anthropic.com", body), expected);
        let litellm = post("/anthropic/v1/messages", "localhost:4000", body);
        assert_eq!(litellm, expected);
        let no_model = r#"{"max_tokens":1024,"messages":[{"role":"user","content":"Hi"}]}"#;
        assert_eq!(post("/v1/messages", "api.anthropic.com", no_model), None);
        // Token counting takes the same body but is not a call.
        assert_eq!(post("/v1/messages/count_tokens", "api.anthropic.com", body), None);
        // OpenAI Assistants thread messages are not Anthropic messages.
        let thread = r#"{"role":"user","content":"How does AI work?"}"#;
        assert_eq!(post("/v1/threads/thread_abc/messages", "api.openai.com", thread), None);
    }

    #[test]
    fn claude_on_vertex_ai() {
        let target =
            "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict";
        let body = r#"{"anthropic_version":"vertex-2023-10-16","messages":[{"role":"user","content":"Hi"}],"max_tokens":256,"stream":true}"#;
        let expected = call(ApiKind::AnthropicMessages, "vertex_ai", Some("claude-sonnet-4@20250514"), true);
        assert_eq!(post(target, "us-east5-aiplatform.googleapis.com", body), expected);
        let target = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict";
        assert_eq!(post(target, "us-east5-aiplatform.googleapis.com", body), None);
    }

    #[test]
    fn gemini_generate_content() {
        let body = r#"{"contents":[{"role":"user","parts":[{"text":"Explain how AI works"}]}],
            "generationConfig":{"temperature":0.9}}"#;
        let host = "generativelanguage.googleapis.com";
        let expected = call(ApiKind::GeminiGenerateContent, "gemini", Some("gemini-2.0-flash"), false);
        assert_eq!(post("/v1beta/models/gemini-2.0-flash:generateContent?key=AIza", host, body), expected);
        let expected = call(ApiKind::GeminiGenerateContent, "gemini", Some("gemini-2.5-pro"), true);
        assert_eq!(post("/v1/models/gemini-2.5-pro:streamGenerateContent?alt=sse", host, body), expected);

        let vertex =
            "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-1.5-pro-002:generateContent";
        let expected = call(ApiKind::GeminiGenerateContent, "vertex_ai", Some("gemini-1.5-pro-002"), false);
        assert_eq!(post(vertex, "us-central1-aiplatform.googleapis.com", body), expected);
        // A proxy with an unknown host: the provider comes from the shape.
        let proxied = post("/gemini/v1beta/models/gemini-2.0-flash:generateContent", "llm-proxy.internal", body);
        assert_eq!(proxied.unwrap().provider, "gemini");

        assert_eq!(post("/v1beta/models/gemini-2.0-flash:countTokens", host, body), None);
        assert_eq!(post("/v1beta/models/gemini-2.0-flash:generateContent", host, r#"{"prompt":"x"}"#), None);
        assert_eq!(post("/v1beta/models/:generateContent", host, body), None);
    }

    #[test]
    fn ollama_native_streams_by_default() {
        let host = "localhost:11434";
        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"why is the sky blue?"}]}"#;
        assert_eq!(post("/api/chat", host, body), call(ApiKind::OllamaChat, "ollama", Some("llama3.2"), true));
        let body = r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
        assert_eq!(post("/api/chat", host, body), call(ApiKind::OllamaChat, "ollama", Some("llama3.2"), false));
        let body = r#"{"model":"llama3.2","prompt":"Why is the sky blue?"}"#;
        let expected = call(ApiKind::OllamaGenerate, "ollama", Some("llama3.2"), true);
        assert_eq!(post("/api/generate", "ollama.lan", body), expected);
        // Loading a model: no prompt, not a call.
        assert_eq!(post("/api/generate", host, r#"{"model":"llama3.2"}"#), None);
        assert_eq!(post("/api/chat", host, r#"{"messages":[{"role":"user","content":"hi"}]}"#), None);
        // OpenAI-compatible API on Ollama's port, also over IPv6.
        let body = r#"{"model":"qwen2.5","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(post("/v1/chat/completions", host, body).unwrap().provider, "ollama");
        assert_eq!(post("/v1/chat/completions", "[::1]:11434", body).unwrap().provider, "ollama");
        assert_eq!(post("/v1/chat/completions", "[::1]:8000", body).unwrap().provider, "openai_compatible");
    }

    #[test]
    fn providers_by_host() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        for (host, provider) in [
            ("API.OpenAI.com:443", "openai"),
            ("api.openai.com.", "openai"),
            ("api.mistral.ai", "mistral"),
            ("api.together.xyz", "together"),
            ("api.deepseek.com", "deepseek"),
            ("api.x.ai", "xai"),
            ("api.fireworks.ai", "fireworks"),
            ("api.cohere.com", "cohere"),
            ("aiplatform.googleapis.com", "vertex_ai"),
            ("api.anthropic.com", "anthropic"),
            // Not a subdomain of a known suffix.
            ("openai.azure.com", "openai_compatible"),
            ("evil-openai.azure.com.example", "openai_compatible"),
        ] {
            assert_eq!(post("/v1/chat/completions", host, body).unwrap().provider, provider, "{host}");
        }
        let no_host = RequestView { host: None, ..request("POST", "/v1/messages", "", body.as_bytes()) };
        assert_eq!(detect(&no_host).unwrap().provider, "anthropic");
    }

    #[test]
    fn body_shape_fallback_for_unknown_paths() {
        let body = r#"{"model":"corp-gpt","messages":[{"role":"system","content":"x"},{"role":"user","content":"hi"}],"stream":true}"#;
        let expected = call(ApiKind::ChatCompletions, "openai_compatible", Some("corp-gpt"), true);
        assert_eq!(post("/llm/invoke", "gateway.corp.example", body), expected);
        assert_eq!(post("/llm/invoke", "api.openai.com", body).unwrap().provider, "openai");
        // Every message needs a role; model must be a string; messages non-empty.
        let body = r#"{"model":"corp-gpt","messages":[{"role":"user","content":"hi"},{"text":"x"}]}"#;
        assert_eq!(post("/llm/invoke", "gateway", body), None);
        assert_eq!(post("/llm/invoke", "gateway", r#"{"model":7,"messages":[{"role":"user"}]}"#), None);
        assert_eq!(post("/llm/invoke", "gateway", r#"{"model":"m","messages":[]}"#), None);
        // A messaging app's API has messages but no model.
        let body = r#"{"channel":"C1","messages":[{"role":"member","text":"lunch?"}]}"#;
        assert_eq!(post("/api/messages", "chat.example", body), None);
    }

    #[test]
    fn not_model_calls() {
        assert_eq!(detect(&request("GET", "/v1/models", "api.openai.com", b"")), None);
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(detect(&request("PUT", "/v1/chat/completions", "api.openai.com", chat)), None);
        assert_eq!(post("/api/login", "app.example", r#"{"username":"ann","password":"hunter2"}"#), None);
        let form = RequestView {
            content_type: Some(b"application/x-www-form-urlencoded"),
            ..request("POST", "/v1/chat/completions", "api.openai.com", b"model=gpt-4o&messages=hi")
        };
        assert_eq!(detect(&form), None);
        let multipart = "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n";
        assert_eq!(post("/v1/audio/transcriptions", "api.openai.com", multipart), None);
        assert_eq!(post("/v1/chat/completions", "api.openai.com", ""), None);
        assert_eq!(post("/v1/chat/completions", "api.openai.com", "[1,2]"), None);
    }

    #[test]
    fn malformed_bodies_are_not_calls() {
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]"#,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]} trailing"#,
            r#"{"model":"gpt-4o","messages":[{"role":"user",}]}"#,
        ] {
            assert_eq!(post("/v1/chat/completions", "api.openai.com", body), None, "{body}");
        }
        let invalid_utf8 = b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}";
        assert_eq!(detect(&request("POST", "/v1/chat/completions", "api.openai.com", invalid_utf8)), None);
        let deep = format!("{{\"model\":\"m\",\"messages\":{}{}}}", "[".repeat(500), "]".repeat(500));
        assert_eq!(post("/v1/chat/completions", "api.openai.com", &deep), None);
    }

    #[test]
    fn lenient_where_servers_are() {
        // Escaped key, repeated key (last wins), non-boolean stream, overlong model.
        let body = r#"{"model":"a","stream":"yes","messages":[{"role":"user","content":"hi"}],"mod\u0065l":"gpt-4o"}"#;
        let expected = call(ApiKind::ChatCompletions, "openai", Some("gpt-4o"), false);
        assert_eq!(post("/v1/chat/completions", "api.openai.com", body), expected);
        let long = format!(r#"{{"model":"{}","messages":[{{"role":"user"}}]}}"#, "m".repeat(MAX_MODEL_BYTES + 1));
        assert_eq!(post("/v1/chat/completions", "api.openai.com", &long).unwrap().model, None);
    }

    fn truncated(target: &str, body: &[u8]) -> Option<ApiCall> {
        detect(&RequestView { body_truncated: true, ..request("POST", target, "localhost:8000", body) })
    }

    #[test]
    fn truncated_bodies_are_scanned() {
        let huge = "x".repeat(2 << 20);
        let body = format!(r#"{{"model" : "gpt-4o", "stream":	true, "messages":[{{"role":"user","content":"{huge}"#);
        let expected = call(ApiKind::ChatCompletions, "openai_compatible", Some("gpt-4o"), true);
        assert_eq!(truncated("/v1/chat/completions", body.as_bytes()), expected);
        // The path must carry recognition when the body shape is unknown.
        assert_eq!(truncated("/llm/invoke", body.as_bytes()), None);
        // Keys quoted inside strings, or with non-string values, are skipped.
        let body = r#"{"messages":[{"role":"user","content":"say \"model\": \"evil\""}],"x\"model":"evil","tools":{"model":{}},"model":"m1","#;
        assert_eq!(truncated("/v1/chat/completions", body.as_bytes()).unwrap().model.as_deref(), Some("m1"));
        // Model past the scanned head: unknown, but still a call.
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{huge}"}}],"model":"gpt-4o","stream":true}}"#);
        assert_eq!(
            truncated("/v1/chat/completions", body.as_bytes()),
            call(ApiKind::ChatCompletions, "openai_compatible", None, false)
        );
        // Ollama streams unless the scan finds `"stream": false`.
        let body = br#"{"model":"llama3.2","stream":false,"prompt":"xxxx"#;
        assert_eq!(truncated("/api/generate", body), call(ApiKind::OllamaGenerate, "ollama", Some("llama3.2"), false));
        let chat = truncated("/api/chat", br#"{"model":"llama3.2","messages":[{"#);
        assert!(chat.unwrap().stream);
        let gemini =
            truncated("/v1beta/models/gemini-2.0-flash:streamGenerateContent", br#"{"contents":[{"parts":[{"text":"#);
        assert_eq!(gemini, call(ApiKind::GeminiGenerateContent, "gemini", Some("gemini-2.0-flash"), true));
        // Unterminated model string, and a body that is no JSON object at all.
        assert_eq!(truncated("/v1/chat/completions", br#"{"model":"gpt-4"#).unwrap().model, None);
        assert_eq!(truncated("/v1/chat/completions", b"model=gpt-4o&messages="), None);
    }

    #[test]
    fn oversized_bodies_are_scanned_not_parsed() {
        let body = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(MAX_PARSE_BYTES)
        );
        let expected = call(ApiKind::ChatCompletions, "openai_compatible", Some("gpt-4o"), false);
        assert_eq!(detect(&request("POST", "/v1/chat/completions", "localhost:8000", body.as_bytes())), expected);
    }

    #[test]
    fn prefilter() {
        assert!(may_be_api_call("POST", "/v1/chat/completions"));
        assert!(may_be_api_call("POST", "/llm/invoke?x=1"));
        assert!(!may_be_api_call("GET", "/v1/models"));
        assert!(!may_be_api_call("post", "/v1/chat/completions"));
        assert!(!may_be_api_call("POST", "/v1/messages/count_tokens?beta=true"));
        assert!(!may_be_api_call("POST", "/v1beta/models/gemini-2.0-flash:countTokens"));
    }

    #[test]
    fn responses_alone_are_recognised_by_their_shape() {
        let json = Some(&b"application/json"[..]);
        let sse = Some(&b"text/event-stream"[..]);
        type Case<'a> = (Option<&'a [u8]>, &'a str, Option<(ApiKind, bool)>);
        let cases: [Case<'_>; 10] = [
            (json, r#"{"id":"c","object":"chat.completion","choices":[]}"#, Some((ApiKind::ChatCompletions, false))),
            (
                sse,
                "data: {\"object\":\"chat.completion.chunk\"}\n\ndata: [DONE]\n\n",
                Some((ApiKind::ChatCompletions, true)),
            ),
            (json, r#"{"object":"text_completion","choices":[]}"#, Some((ApiKind::Completions, false))),
            (
                sse,
                "event: response.created\ndata: {\"type\":\"response.created\"}\n\n",
                Some((ApiKind::Responses, true)),
            ),
            (json, r#"{"object":"list","data":[{"embedding":[0.1]}]}"#, Some((ApiKind::Embeddings, false))),
            (
                sse,
                "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
                Some((ApiKind::AnthropicMessages, true)),
            ),
            (json, r#"{"candidates":[{"content":{"parts":[]}}]}"#, Some((ApiKind::GeminiGenerateContent, false))),
            (
                None,
                "{\"model\":\"l\",\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true,\"message\":{}}\n",
                Some((ApiKind::OllamaChat, true)),
            ),
            (json, r#"{"error":{"message":"rate limited","type":"rate_limit"}}"#, None),
            (json, r#"{"status":"ok"}"#, None),
        ];
        for (content_type, body, expected) in cases {
            assert_eq!(response_api(content_type, body.as_bytes()), expected, "{body}");
        }
        // A document longer than what was sniffed: its top-level keys tell.
        let cut =
            format!(r#"{{"id":"c","object":"chat.completion","choices":[{{"message":{{"content":"{}"#, "x".repeat(100));
        assert_eq!(response_api(json, cut.as_bytes()), Some((ApiKind::ChatCompletions, false)));
        assert_eq!(response_api(json, b"<html>"), None);
    }

    #[test]
    fn requests_known_by_their_start_line_only() {
        let unknown = ApiCall { api: ApiKind::Unknown, provider: "unknown", model: None, stream: false };
        assert_eq!(detect_unparsed("POST", "/gateway/x", None), Some(unknown));
        assert_eq!(detect_unparsed("GET", "/v1/chat/completions", None), None);
        assert_eq!(detect_unparsed("POST", "/v1/messages/count_tokens", None), None);
        let gemini =
            detect_unparsed("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", None).unwrap();
        assert_eq!(
            (gemini.api, gemini.model.as_deref(), gemini.stream),
            (ApiKind::GeminiGenerateContent, Some("gemini-2.0-flash"), true)
        );
    }
}
