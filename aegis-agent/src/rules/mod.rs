//! Rulepacks and the matching engine: what in a prompt or an output is a finding.
//!
//! - [`pack`]: the rulepack file format (TOML), validation with precise errors, digest.
//! - [`gitleaks`]: gitleaks TOML rule files loaded as a rulepack.
//! - [`normalize`]: text normalisation before matching (bounded cost).
//! - [`validators`]: checks a regex match must pass (Luhn, IBAN, entropy, JWT).
//! - [`engine`]: every rule of every pack compiled together; keyword prefilter, then only
//!   the candidate rules' regexes and validators.

pub mod engine;
pub mod gitleaks;
pub mod normalize;
pub mod pack;
pub mod validators;
