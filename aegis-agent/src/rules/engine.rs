//! Every rule of every pack compiled together. (STUB: interface only.)

use std::ops::Range;

use super::{
    normalize::{Encoding, NormalizeLimits},
    pack::{Direction, PackError, Rule, Rulepack, Scope},
};

/// Identity of a loaded pack, carried by decisions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PackInfo {
    pub name: String,
    pub version: String,
    pub digest: String,
}

/// One rule matched.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// Index into [`Engine::rules`].
    pub rule: usize,
    /// Byte range of the match in the normalised text (for a match inside a decoded
    /// segment: the segment's range).
    pub span: Range<usize>,
    /// The matched text (the secret group when the rule has one), normalised.
    pub matched: String,
    /// Set when the match was found inside a decoded base64/hex/percent segment.
    pub decoded_from: Option<Encoding>,
}

/// What one scan cost and skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub bytes: usize,
    /// Rules whose regex/validators ran (candidates after the prefilter).
    pub candidates: usize,
    /// Input bytes not normalised (over the normalisation bound).
    pub unnormalized_bytes: usize,
    /// Encoded segments not decoded (over the bound).
    pub undecoded_segments: usize,
}

/// The compiled rule set.
pub struct Engine {
    rules: Vec<(usize, Rule)>,
    packs: Vec<PackInfo>,
}

impl Engine {
    /// Compile every rule of `packs`. Regexes are compiled with size limits: a regex too
    /// large to compile within them is rejected with its pack, line and rule id (the
    /// regex crate runs in linear time, so no regex can be catastrophic at match time).
    pub fn compile(packs: Vec<Rulepack>, limits: NormalizeLimits) -> Result<Self, PackError> {
        let _ = limits;
        let mut rules = Vec::new();
        let mut infos = Vec::new();
        for (i, p) in packs.into_iter().enumerate() {
            infos.push(PackInfo { name: p.name, version: p.version, digest: p.digest });
            rules.extend(p.rules.into_iter().map(|r| (i, r)));
        }
        Ok(Self { rules, packs: infos })
    }

    /// Scan `text` taken from `scope` of a `direction` (Request or Response) body; push
    /// the findings of rules that apply to that direction and scope.
    pub fn scan(&self, text: &[u8], direction: Direction, scope: Scope, out: &mut Vec<Finding>) -> ScanStats {
        let _ = (text, direction, scope, out);
        ScanStats::default()
    }

    pub fn rule(&self, index: usize) -> &Rule {
        &self.rules[index].1
    }

    /// The pack a rule came from.
    pub fn rule_pack(&self, index: usize) -> &PackInfo {
        &self.packs[self.rules[index].0]
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|(_, r)| r)
    }

    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }
}

/// A rule example that did not behave as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExampleFailure {
    pub rule: String,
    /// true: a positive example that did not match; false: a negative one that did.
    pub positive: bool,
    pub example: String,
}

/// Run every rule's examples (positive ones scanned in every scope and direction the rule
/// applies to). Empty: all pass.
pub fn test_examples(engine: &Engine) -> Vec<ExampleFailure> {
    let _ = engine;
    Vec::new()
}
