//! Rulepacks and the matching engine: what in a prompt or an output is a finding.
//!
//! - [`pack`]: the rulepack file format (TOML), validation with precise errors, digest.
//! - [`gitleaks`]: gitleaks TOML rule files loaded as a rulepack.
//! - [`normalize`]: text normalisation before matching (bounded cost).
//! - [`validators`]: checks a regex match must pass (Luhn, IBAN, entropy, JWT).
//! - [`classifier`]: the learned second stage, a linear model that scores a text for prompt
//!   injection and jailbreak (embedded: `packaging/models/injection_classifier.bin`).
//! - [`engine`]: every rule of every pack compiled together; keyword prefilter, then only
//!   the candidate rules' regexes and validators.

mod bytemask;
pub mod classifier;
pub mod engine;
#[cfg(test)]
mod eval;
pub mod gitleaks;
pub mod normalize;
pub mod pack;
pub mod validators;
mod window_filter;

use std::path::{Path, PathBuf};

use self::{
    engine::Engine,
    normalize::NormalizeLimits,
    pack::{Action, PackError, ProviderPolicy, Rulepack, Severity},
};

/// The default rulepack shipped in `packaging/rules/default.toml`, used when the
/// configuration names none.
pub const DEFAULT_PACK: &str = include_str!("../../../packaging/rules/default.toml");
const DEFAULT_PACK_NAME: &str = "<embedded>/packaging/rules/default.toml";

/// Load and compile `paths` (the embedded default pack when empty).
pub fn load_engine(paths: &[PathBuf]) -> Result<Engine, PackError> {
    load(paths).map(|(engine, _)| engine)
}

/// A provider/model allowlist with the "name@version" of its pack.
pub type PackPolicy = (String, ProviderPolicy);

/// Load `paths` (the embedded default pack when empty): the compiled content rules, and
/// the packs' provider/model allowlists.
pub fn load(paths: &[PathBuf]) -> Result<(Engine, Vec<PackPolicy>), PackError> {
    load_with(paths, &[])
}

/// [`load`], plus packs given as text (`(name, TOML)`: a fleet policy's), after the others.
pub fn load_with(paths: &[PathBuf], extra: &[(String, String)]) -> Result<(Engine, Vec<PackPolicy>), PackError> {
    let mut packs: Vec<Rulepack> = if paths.is_empty() {
        vec![pack::parse(DEFAULT_PACK, Path::new(DEFAULT_PACK_NAME))?]
    } else {
        paths.iter().map(|p| pack::load(p)).collect::<Result<_, _>>()?
    };
    for (name, text) in extra {
        packs.push(pack::parse(text, Path::new(&format!("fleet:{name}")))?);
    }
    let policies = packs
        .iter()
        .flat_map(|p| p.policies.iter().map(|pol| (format!("{}@{}", p.name, p.version), pol.clone())))
        .collect();
    Ok((Engine::compile(packs, NormalizeLimits::default())?, policies))
}

/// The classifier model shipped in `packaging/models/injection_classifier.bin` (trained by
/// `tools/classifier/train.py`), so the default configuration has it.
pub const DEFAULT_MODEL: &[u8] = include_bytes!("../../../packaging/models/injection_classifier.bin");

/// The learned second stage as configured: its model, and what a score at or above the
/// threshold means. Its matches are recorded like a rule's, as rule
/// [`classifier::RULE_ID`].
#[derive(Debug)]
pub struct Classifier {
    pub model: classifier::Model,
    pub threshold: f32,
    pub action: Action,
    pub severity: Severity,
}

impl Classifier {
    /// The embedded model, with `threshold` (the model's own when None: at most 1% false
    /// positives on the trainer's benign texts) and `action` for a score at or above it.
    pub fn embedded(threshold: Option<f32>, action: Action) -> Result<Self, String> {
        let mut model = classifier::Model::parse(DEFAULT_MODEL)?;
        model.digest = pack::digest(DEFAULT_MODEL);
        let threshold = threshold.unwrap_or(model.default_threshold);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(format!("rules.classifier_threshold = {threshold}: give a probability between 0 and 1"));
        }
        Ok(Self { model, threshold, action, severity: Severity::Sev2 })
    }

    /// Identity of the model, as decisions carry it.
    pub fn info(&self) -> engine::PackInfo {
        engine::PackInfo {
            name: classifier::MODEL_NAME.to_owned(),
            version: self.model.version.clone(),
            digest: self.model.digest.clone(),
        }
    }
}
