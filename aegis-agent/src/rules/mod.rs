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

use std::path::{Path, PathBuf};

use self::{
    engine::Engine,
    normalize::NormalizeLimits,
    pack::{PackError, ProviderPolicy, Rulepack},
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
