//! The texts of a model API call that rules inspect, each tagged with the part of the
//! body it came from ([`Scope`]): system prompt, user, assistant and tool messages of a
//! request, and the generated output of a response.
//!
//! Only the fields that carry text are taken, so a rule scoped to user messages never
//! sees the system prompt, and JSON syntax, ids and numbers never reach the matcher.

use super::{detect::ApiKind, json::Json};
use crate::rules::pack::Scope;

/// Texts of a request body, by scope. None when the body is not JSON (truncated,
/// undecodable): the caller then scans the raw body as one [`Scope::Text`].
pub fn request_texts(api: ApiKind, body: &[u8]) -> Option<Vec<(Scope, String)>> {
    let v = Json::parse(body).ok()?;
    let mut out = Vec::new();
    match api {
        // Nothing says which fields carry the text: the caller scans it all as text.
        ApiKind::Unknown => return None,
        ApiKind::ChatCompletions | ApiKind::OllamaChat => {
            for m in items(&v, "messages") {
                let scope = role_scope(m.get("role").and_then(Json::as_str));
                push_content(&mut out, scope, m.get("content"));
                // Tool calls the assistant made (their arguments are model output fed back).
                for call in items(m, "tool_calls") {
                    push_str(&mut out, Scope::Assistant, call.pointer("/function/arguments"));
                }
            }
        }
        ApiKind::Completions | ApiKind::OllamaGenerate => {
            push_content(&mut out, Scope::User, v.get("prompt"));
            push_str(&mut out, Scope::System, v.get("system"));
        }
        ApiKind::Embeddings => push_content(&mut out, Scope::User, v.get("input")),
        ApiKind::Responses => {
            push_str(&mut out, Scope::System, v.get("instructions"));
            match v.get("input") {
                Some(Json::Array(input)) => {
                    for item in input {
                        if let Some(role) = item.get("role").and_then(Json::as_str) {
                            push_content(&mut out, role_scope(Some(role)), item.get("content"));
                        } else if item.get("type").and_then(Json::as_str) == Some("function_call_output") {
                            push_content(&mut out, Scope::Tool, item.get("output"));
                        }
                    }
                }
                other => push_content(&mut out, Scope::User, other),
            }
        }
        ApiKind::AnthropicMessages => {
            push_content(&mut out, Scope::System, v.get("system"));
            for m in items(&v, "messages") {
                let scope = role_scope(m.get("role").and_then(Json::as_str));
                match m.get("content") {
                    Some(Json::Array(blocks)) => {
                        for b in blocks {
                            match b.get("type").and_then(Json::as_str) {
                                Some("tool_result") => push_content(&mut out, Scope::Tool, b.get("content")),
                                Some("tool_use") => push_json(&mut out, Scope::Assistant, b.get("input")),
                                _ => push_str(&mut out, scope, b.get("text")),
                            }
                        }
                    }
                    other => push_content(&mut out, scope, other),
                }
            }
        }
        ApiKind::GeminiGenerateContent => {
            for p in items_at(&v, "/systemInstruction/parts") {
                push_str(&mut out, Scope::System, p.get("text"));
            }
            for c in items(&v, "contents") {
                let scope = match c.get("role").and_then(Json::as_str) {
                    Some("model") => Scope::Assistant,
                    _ => Scope::User,
                };
                for p in items(c, "parts") {
                    push_str(&mut out, scope, p.get("text"));
                    push_json(&mut out, Scope::Tool, p.pointer("/functionResponse/response"));
                }
            }
        }
    }
    Some(out)
}

fn role_scope(role: Option<&str>) -> Scope {
    match role {
        Some("system" | "developer") => Scope::System,
        Some("assistant" | "model") => Scope::Assistant,
        Some("tool" | "function" | "ipython") => Scope::Tool,
        _ => Scope::User,
    }
}

fn items<'v, 'a>(v: &'v Json<'a>, key: &str) -> &'v [Json<'a>] {
    v.get(key).and_then(Json::as_array).unwrap_or(&[])
}

fn items_at<'v, 'a>(v: &'v Json<'a>, pointer: &str) -> &'v [Json<'a>] {
    v.pointer(pointer).and_then(Json::as_array).unwrap_or(&[])
}

fn push_str(out: &mut Vec<(Scope, String)>, scope: Scope, v: Option<&Json>) {
    if let Some(s) = v.and_then(Json::as_str).filter(|s| !s.is_empty()) {
        out.push((scope, s.to_owned()));
    }
}

/// Structured tool input/output: scanned as its JSON text (as `serde_json::Value` prints it).
fn push_json(out: &mut Vec<(Scope, String)>, scope: Scope, v: Option<&Json>) {
    match v {
        Some(Json::String(_)) => push_str(out, scope, v),
        Some(v @ (Json::Object(_) | Json::Array(_))) => out.push((scope, v.to_value().to_string())),
        _ => {}
    }
}

/// A message content: a string, or an array of parts with text (OpenAI `text` /
/// `input_text` / `output_text`, Anthropic text blocks), or of strings (prompt lists).
fn push_content(out: &mut Vec<(Scope, String)>, scope: Scope, v: Option<&Json>) {
    match v {
        Some(Json::String(_)) => push_str(out, scope, v),
        Some(Json::Array(parts)) => {
            for p in parts {
                match p {
                    Json::String(_) => push_str(out, scope, Some(p)),
                    Json::Object(_) => push_str(out, scope, p.get("text")),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(api: ApiKind, body: &str) -> Vec<(Scope, String)> {
        request_texts(api, body.as_bytes()).expect("valid JSON")
    }

    fn s(scope: Scope, t: &str) -> (Scope, String) {
        (scope, t.to_owned())
    }

    #[test]
    fn openai_chat_roles_and_parts() {
        let body = r#"{"model":"m","messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":"{\"q\":1}"}}]},
            {"role":"tool","content":"result text"}]}"#;
        assert_eq!(
            texts(ApiKind::ChatCompletions, body),
            [
                s(Scope::System, "You are terse."),
                s(Scope::User, "hello"),
                s(Scope::Assistant, "{\"q\":1}"),
                s(Scope::Tool, "result text")
            ]
        );
    }

    #[test]
    fn anthropic_system_blocks_and_tool_results() {
        let body = r#"{"model":"c","max_tokens":5,"system":[{"type":"text","text":"sys"}],"messages":[
            {"role":"user","content":[{"type":"text","text":"hi"},{"type":"tool_result","tool_use_id":"t","content":"tool says"}]},
            {"role":"assistant","content":"ok"}]}"#;
        assert_eq!(
            texts(ApiKind::AnthropicMessages, body),
            [s(Scope::System, "sys"), s(Scope::User, "hi"), s(Scope::Tool, "tool says"), s(Scope::Assistant, "ok")]
        );
    }

    #[test]
    fn gemini_responses_completions_embeddings() {
        let gem = r#"{"systemInstruction":{"parts":[{"text":"be nice"}]},"contents":[{"role":"user","parts":[{"text":"q"}]},{"role":"model","parts":[{"text":"a"}]}]}"#;
        assert_eq!(
            texts(ApiKind::GeminiGenerateContent, gem),
            [s(Scope::System, "be nice"), s(Scope::User, "q"), s(Scope::Assistant, "a")]
        );
        let resp = r#"{"model":"m","instructions":"rules","input":[{"role":"user","content":[{"type":"input_text","text":"x"}]},{"type":"function_call_output","output":"y"}]}"#;
        assert_eq!(
            texts(ApiKind::Responses, resp),
            [s(Scope::System, "rules"), s(Scope::User, "x"), s(Scope::Tool, "y")]
        );
        assert_eq!(texts(ApiKind::Responses, r#"{"model":"m","input":"plain"}"#), [s(Scope::User, "plain")]);
        assert_eq!(
            texts(ApiKind::Completions, r#"{"model":"m","prompt":["a","b"]}"#),
            [s(Scope::User, "a"), s(Scope::User, "b")]
        );
        assert_eq!(texts(ApiKind::Embeddings, r#"{"model":"m","input":"e"}"#), [s(Scope::User, "e")]);
    }

    /// Structured tool input is scanned as the JSON text `serde_json::Value` prints: keys
    /// sorted, a repeated key's last value, escapes decoded and re-encoded.
    #[test]
    fn tool_input_is_scanned_as_value_prints_it() {
        let input = r#"{"z":1,"a":{"y":"q\"uote","b":[1.5,null]},"z":2}"#;
        let body = format!(
            r#"{{"messages":[{{"role":"assistant","content":[{{"type":"tool_use","id":"t","name":"f","input":{input}}}]}}]}}"#
        );
        let printed = serde_json::from_str::<serde_json::Value>(input).unwrap().to_string();
        assert_eq!(printed, r#"{"a":{"b":[1.5,null],"y":"q\"uote"},"z":2}"#);
        assert_eq!(texts(ApiKind::AnthropicMessages, &body), [s(Scope::Assistant, &printed)]);
    }

    #[test]
    fn non_json_is_none() {
        assert_eq!(request_texts(ApiKind::ChatCompletions, b"{\"model\":\"m\",\"messages\":[{\"ro"), None);
    }
}
