//! `aegis-agent scan`: the daemon's engine on an API body or a plain text, from a file or
//! standard input; prints the decision as one JSON object. Exit status: 0 allow, 1 warn,
//! 2 block, 3 error, 64 usage error (see [`exit_code`] and [`super::exit`]).

use std::{io::Read as _, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    llm::{
        detect::{ApiCall, ApiKind},
        response::ResponseReader,
    },
    policy::{
        Inspector,
        decision::Decision,
        inspect::{CallInspection, Unseen},
        redact::Redactor,
    },
    protocol::http1::{Header, MessageHead},
    rules::{self, pack::Action},
};

/// Input read at most; the rest is not scanned and the decision says so.
const MAX_INPUT: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanAs {
    /// A model API request body (JSON); texts are scoped by message role.
    Request,
    /// A model API response body: JSON, or a Server-Sent Events / NDJSON stream.
    Response,
    /// Plain text: every rule applies, whatever its scope.
    Text,
}

#[derive(Serialize)]
struct Output {
    #[serde(flatten)]
    decision: Decision,
    input: InputInfo,
}

#[derive(Serialize)]
struct InputInfo {
    #[serde(rename = "as")]
    scan_as: ScanAs,
    api: Option<ApiKind>,
    bytes: usize,
    /// Where the keyed-hash key came from ("ephemeral": hashes match nothing elsewhere).
    evidence_key: String,
}

pub struct ScanArgs {
    pub rulepacks: Vec<PathBuf>,
    pub scan_as: ScanAs,
    pub api: Option<ApiKind>,
    pub input: Option<PathBuf>,
    pub evidence_key: PathBuf,
}

/// Run the scan; returns the decision's exit code.
pub fn run(args: ScanArgs) -> anyhow::Result<u8> {
    let engine = rules::load_engine(&args.rulepacks)?;
    // Use the host's key when there is one (so hashes match the daemon's records); never
    // create it from a one-off scan.
    let host_key = args.evidence_key.exists().then(|| Redactor::load_or_create(&args.evidence_key).ok()).flatten();
    let (redactor, key_source) = match host_key {
        Some(r) => (r, args.evidence_key.display().to_string()),
        None => (Redactor::new(ephemeral_key()?), "ephemeral".to_owned()),
    };
    let inspector = Arc::new(Inspector::new(engine, redactor));
    let mut data = Vec::new();
    let limit = MAX_INPUT as u64 + 1;
    match &args.input {
        Some(p) if p.as_os_str() != "-" => {
            // A regular file only (a FIFO would block): pipes come on standard input.
            let (file, _) = crate::files::open_regular(p).with_context(|| {
                format!("cannot scan {} (to scan a pipe, give it on standard input: -)", p.display())
            })?;
            file.take(limit).read_to_end(&mut data).with_context(|| format!("cannot read {}", p.display()))?;
        }
        _ => {
            std::io::stdin().lock().take(limit).read_to_end(&mut data)?;
        }
    }
    let truncated = data.len() > MAX_INPUT;
    data.truncate(MAX_INPUT);

    let mut inspection = CallInspection::new(inspector);
    if truncated {
        let part = if args.scan_as == ScanAs::Response { Unseen::ResponseBody } else { Unseen::RequestBody };
        inspection.uninspectable(part, format!("input_over_{MAX_INPUT}_bytes"));
    }
    let api = match args.scan_as {
        ScanAs::Text => {
            inspection.text(&data);
            None
        }
        ScanAs::Request => {
            let api = args.api.or_else(|| guess_request_api(&data)).unwrap_or(ApiKind::ChatCompletions);
            inspection.request(crate::llm::content::request_texts(api, &data), &data, truncated);
            Some(api)
        }
        ScanAs::Response => {
            let api = args.api.or_else(|| guess_response_api(&data)).unwrap_or(ApiKind::ChatCompletions);
            let call = ApiCall { api, provider: "cli", model: None, stream: is_stream(&data) };
            let head = MessageHead {
                method: None,
                target: None,
                status: Some(200),
                minor_version: 1,
                headers: vec![Header {
                    name: "content-type".into(),
                    value: if call.stream { "text/event-stream" } else { "application/json" }.into(),
                }],
                wire_len: 0,
                skimmed: None,
            };
            // The daemon's reader and its end, so that both see a response alike.
            let mut reader = ResponseReader::new(&call, &head, MAX_INPUT);
            reader.feed(&data);
            reader.finish_into(Some(&mut inspection), 0.0);
            Some(api)
        }
    };
    let decision = inspection.finish(false);
    let code = exit_code(decision.action);
    let out = Output {
        decision,
        input: InputInfo { scan_as: args.scan_as, api, bytes: data.len(), evidence_key: key_source },
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(code)
}

fn ephemeral_key() -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("cannot read /dev/urandom for an ephemeral evidence key")?;
    Ok(key)
}

/// 0 allow, 1 warn, 2 block (3 is for errors, set by the caller).
pub fn exit_code(action: Action) -> u8 {
    match action {
        Action::Allow => super::exit::OK,
        Action::Warn => super::exit::NO,
        Action::Block => super::exit::BLOCK,
    }
}

fn is_stream(data: &[u8]) -> bool {
    let start = data.trim_ascii_start();
    start.starts_with(b"data:") || start.starts_with(b"event:") || start.starts_with(b":")
}

/// The API a request body is for, from its keys.
fn guess_request_api(data: &[u8]) -> Option<ApiKind> {
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let has = |k: &str| v.get(k).is_some();
    Some(if has("contents") {
        ApiKind::GeminiGenerateContent
    } else if has("messages") && (has("max_tokens") && has("system") || has("anthropic_version")) {
        ApiKind::AnthropicMessages
    } else if has("messages") {
        ApiKind::ChatCompletions
    } else if has("instructions")
        || (has("input") && !has("encoding_format") && !has("dimensions") && has("model") && v["input"].is_array())
    {
        ApiKind::Responses
    } else if has("input") {
        ApiKind::Embeddings
    } else if has("prompt") {
        ApiKind::Completions
    } else {
        return None;
    })
}

/// The API a response body (or the first event of a stream) is from, from its keys.
fn guess_response_api(data: &[u8]) -> Option<ApiKind> {
    let text = String::from_utf8_lossy(&data[..data.len().min(64 * 1024)]);
    let probe = |k: &str| text.contains(&format!("\"{k}\""));
    Some(if probe("candidates") {
        ApiKind::GeminiGenerateContent
    } else if probe("choices") {
        ApiKind::ChatCompletions
    } else if text.contains("\"response.") || probe("output") {
        ApiKind::Responses
    } else if text.contains("content_block")
        || text.contains("\"type\":\"message\"")
        || text.contains("\"type\": \"message\"")
    {
        ApiKind::AnthropicMessages
    } else if probe("done") {
        ApiKind::OllamaChat
    } else {
        return None;
    })
}
