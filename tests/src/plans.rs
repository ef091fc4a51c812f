//! The request mixes the tests send: model API calls of every shape, interleaved with
//! ordinary HTTPS requests on the same connection, carrying credentials that must never
//! reach the agent's output.

use serde_json::json;

use crate::clients::{Plan, Request};

pub const OPENAI_KEY: &str = "sk-test-SECRETKEY123";
pub const ANTHROPIC_KEY: &str = "sk-ant-SECRET456";
pub const GOOGLE_KEY: &str = "AIzaSy-SECRET789";
pub const LOGIN_PASSWORD: &str = "hunter2-SECRET-PW";
/// Strings that must not appear anywhere in the agent's output.
pub const SECRETS: [&str; 6] = [OPENAI_KEY, ANTHROPIC_KEY, GOOGLE_KEY, LOGIN_PASSWORD, "SECRETKEY123", "SECRET456"];

pub fn openai_chat(model: &str, user: &str) -> Request {
    Request::post(
        "/v1/chat/completions",
        json!({"model": model, "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": user}]}),
    )
    .header("Authorization", &format!("Bearer {OPENAI_KEY}"))
}

/// Streamed chat; `include_usage` asks for the final usage chunk.
pub fn openai_chat_stream(model: &str, user: &str, include_usage: bool) -> Request {
    let mut body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": user}]});
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    Request::post("/v1/chat/completions", body).header("Authorization", &format!("Bearer {OPENAI_KEY}"))
}

pub fn anthropic_messages(model: &str, user: &str, stream: bool) -> Request {
    Request::post(
        "/v1/messages",
        json!({"model": model, "max_tokens": 256, "stream": stream, "system": "Be brief.",
               "messages": [{"role": "user", "content": [{"type": "text", "text": user}]}]}),
    )
    .header("x-api-key", ANTHROPIC_KEY)
    .header("anthropic-version", "2023-06-01")
}

pub fn health() -> Request {
    Request::get("/health")
}

pub fn blob() -> Request {
    Request::get("/static/blob")
}

pub fn login() -> Request {
    Request::post("/api/login", json!({"username": "alice", "password": LOGIN_PASSWORD}))
}

/// Calls every client makes: OpenAI chat (plain, streamed with usage, gzip), Anthropic
/// (streamed and not), with /health, /static/blob and /api/login in between.
pub fn common_requests() -> Vec<Request> {
    vec![
        health(),
        openai_chat("gpt-4o-mini", "Summarise the plot of Hamlet in one sentence, please."),
        login(),
        openai_chat_stream("gpt-4o", "Write a haiku about kernels and probes.", true),
        blob(),
        anthropic_messages("claude-3-5-haiku-latest", "Name three prime numbers.", true),
        health(),
        anthropic_messages("claude-3-5-sonnet-latest", "What is the capital of France?", false),
        openai_chat("gpt-4.1-nano", "Reply with a compressed body this time.").gzip(),
        blob(),
    ]
}

/// The other API shapes (python only): embeddings, completions, Responses, Gemini, Ollama.
pub fn more_api_requests() -> Vec<Request> {
    vec![
        Request::post(
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["first text to embed", "and a second one"]}),
        )
        .header("Authorization", &format!("Bearer {OPENAI_KEY}")),
        health(),
        Request::post(
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time", "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .header("Authorization", &format!("Bearer {OPENAI_KEY}")),
        Request::post(
            "/v1/responses",
            json!({"model": "gpt-4.1-mini", "instructions": "Answer in French.", "input": "Good morning to you"}),
        )
        .header("Authorization", &format!("Bearer {OPENAI_KEY}")),
        Request::post(
            "/v1/responses",
            json!({"model": "o4-mini", "stream": true,
                   "input": [{"role": "user", "content": [{"type": "input_text", "text": "Count to three"}]}]}),
        )
        .header("Authorization", &format!("Bearer {OPENAI_KEY}")),
        blob(),
        Request::post(
            "/v1beta/models/gemini-2.0-flash:generateContent",
            json!({"contents": [{"role": "user", "parts": [{"text": "Explain eBPF in five words"}]}]}),
        )
        .header("x-goog-api-key", GOOGLE_KEY),
        Request::post(
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            json!({"contents": [{"role": "user", "parts": [{"text": "Stream me a short answer"}]}]}),
        )
        .header("x-goog-api-key", GOOGLE_KEY),
        login(),
        Request::post(
            "/api/chat",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}),
        ),
        health(),
    ]
}

/// `threads` connections of `calls` model calls each (with /health in between); every
/// connection uses its own model name `mock-model-<n>` and its own prompt length.
pub fn concurrent_plan(threads: usize, calls: usize) -> Plan {
    let connections = (0..threads)
        .map(|t| {
            let model = format!("mock-model-{t}");
            let prompt = format!("thread {t} says {}", "word ".repeat(t + 1).trim_end());
            let mut reqs = Vec::new();
            for c in 0..calls {
                reqs.push(match c % 5 {
                    0 => openai_chat(&model, &prompt),
                    1 => openai_chat_stream(&model, &prompt, true),
                    2 => anthropic_messages(&model, &prompt, true),
                    3 => openai_chat(&model, &prompt).gzip(),
                    _ => anthropic_messages(&model, &prompt, false),
                });
                if c % 2 == 1 {
                    reqs.push(health());
                }
            }
            reqs
        })
        .collect();
    Plan { connections }
}
