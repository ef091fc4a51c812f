//! gitleaks TOML rule files as rulepacks. (STUB: interface only.)

use std::path::Path;

use super::pack::{PackError, Rulepack};

/// True when `text` looks like a gitleaks config (top-level `[[rules]]` with `regex`,
/// no AegisPlane `[pack]` table).
pub fn looks_like_gitleaks(text: &str) -> bool {
    let _ = text;
    false
}

/// Convert a gitleaks config into a rulepack (category secret; action and severity from
/// the defaults documented in the README).
pub fn parse(text: &str, source: &Path) -> Result<Rulepack, PackError> {
    let _ = text;
    Err(PackError { file: source.to_owned(), line: None, rule: None, message: "not implemented".into() })
}
