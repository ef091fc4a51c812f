//! Which model API a request is, from its method, path and body shape, not only its
//! host name, so local and self-hosted endpoints count. (STUB: interface only.)

/// The API spoken, independent of who serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
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
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Gemini `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
    GeminiGenerateContent,
    /// Ollama native `POST /api/chat`.
    OllamaChat,
    /// Ollama native `POST /api/generate`.
    OllamaGenerate,
}

/// What the request says about the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub api: ApiKind,
    /// Who serves it: "openai", "anthropic", "gemini", "openrouter", "ollama", ... from the
    /// host when known; otherwise from the API shape ("openai_compatible", "anthropic",
    /// "gemini", "ollama").
    pub provider: &'static str,
    /// Requested model (from the body, or the Gemini path).
    pub model: Option<String>,
    /// Streaming requested (`"stream": true`, or Gemini `:streamGenerateContent`).
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

/// Cheap head-only prefilter: false means this request is surely not a model API call,
/// so its body need not be kept.
pub fn may_be_api_call(method: &str, target: &str) -> bool {
    let _ = target;
    method == "POST"
}

/// Recognise a model API call. None: not one (the exchange is ignored).
pub fn detect(req: &RequestView<'_>) -> Option<ApiCall> {
    let _ = req;
    None
}
