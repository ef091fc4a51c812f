//! The rulepack file format (TOML), its validation and digest. (STUB: interface only.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    PromptInjection,
    Jailbreak,
    Secret,
    Pii,
    UnsafeOutput,
    Policy,
}

/// Which half of a call a rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Request,
    Response,
    Both,
}

/// Which part of an API body a text comes from. Requests: the role of the message it is
/// in (`system`, `user`, `assistant`, `tool`); responses: `output`. `text` is a plain
/// text scanned with no API structure (`aegis-agent scan --as text`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    System,
    User,
    Assistant,
    Tool,
    Output,
    Text,
}

/// Ordered: a stronger action wins when several rules match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Warn,
    Block,
}

/// Ordered by urgency: SEV-1 > SEV-2 > SEV-3 (derive order is Sev3 < Sev2 < Sev1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    #[serde(rename = "SEV-3")]
    Sev3,
    #[serde(rename = "SEV-2")]
    Sev2,
    #[serde(rename = "SEV-1")]
    Sev1,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validator {
    Luhn,
    Iban,
    Jwt,
    /// Shannon entropy of the match (or secret group) at least `min` bits per char.
    Entropy { min: f64 },
}

/// How a match is kept as evidence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceMode {
    /// Masked text plus a keyed hash (the default).
    #[default]
    Redacted,
    /// The matched text as is (for rules whose matches are not sensitive, e.g. an
    /// injection phrase).
    Full,
}

/// What a rule matches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matcher {
    /// Literal keywords (matched case-insensitively on normalised text). A rule with
    /// keywords is only evaluated where one occurs. Without a regex, a keyword hit is
    /// the match.
    pub keywords: Vec<String>,
    pub regex: Option<String>,
    /// Capture group holding the secret (gitleaks `secretGroup`); 0 = whole match.
    pub secret_group: usize,
    pub validators: Vec<Validator>,
    /// A match that one of these regexes matches is not a finding.
    pub allow_regexes: Vec<String>,
    /// A match containing one of these (case-insensitive) is not a finding.
    pub stopwords: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Examples {
    /// Each must produce a finding of this rule.
    pub positive: Vec<String>,
    /// None may produce a finding of this rule.
    pub negative: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub id: String,
    pub category: Category,
    pub direction: Direction,
    /// Empty: every scope.
    pub scope: Vec<Scope>,
    pub matcher: Matcher,
    pub action: Action,
    pub severity: Severity,
    pub rationale: String,
    pub evidence: EvidenceMode,
    pub examples: Examples,
    /// Line of the rule in its file (1-based), for error messages.
    pub line: usize,
}

/// Provider/model allowlist for a tenant: a call outside it is a finding (policy drift).
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderPolicy {
    pub id: String,
    /// cgroup path prefix ("/system.slice/chat.service"), or "*" for every process.
    pub tenant: String,
    /// Provider names as in call records ("openai", "anthropic", "openai_compatible"...).
    pub allow_providers: Vec<String>,
    /// Model globs ("gpt-4o*", "claude-*"); empty allows every model of an allowed provider.
    pub allow_models: Vec<String>,
    pub action: Action,
    pub severity: Severity,
    pub rationale: String,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rulepack {
    pub name: String,
    pub version: String,
    /// "sha256:<hex>" of the file's bytes, computed by the agent.
    pub digest: String,
    pub source: PathBuf,
    pub rules: Vec<Rule>,
    pub policies: Vec<ProviderPolicy>,
}

/// Why a rulepack was rejected: file, line, rule and reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), rule.as_ref().map(|r| format!(": rule {r}")).unwrap_or_default())]
pub struct PackError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub rule: Option<String>,
    pub message: String,
}

/// Load a rulepack file: the AegisPlane format, or a gitleaks config (recognised by its
/// content) loaded through [`super::gitleaks`].
pub fn load(path: &Path) -> Result<Rulepack, PackError> {
    let text = std::fs::read_to_string(path).map_err(|e| PackError {
        file: path.to_owned(),
        line: None,
        rule: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Parse and validate rulepack text; `source` names it in errors.
pub fn parse(text: &str, source: &Path) -> Result<Rulepack, PackError> {
    let _ = text;
    Err(PackError { file: source.to_owned(), line: None, rule: None, message: "not implemented".into() })
}
