//! A call's [`Decision`]: what its findings mean, which rule and pack decided, and the
//! evidence of each match, redacted unless the rule asks for the text.

use serde::Serialize;

use super::redact::{Evidence, Redactor};
use crate::rules::{
    engine::{Engine, Finding, PackInfo},
    normalize::Encoding,
    pack::{Action, Category, EvidenceMode, Scope, Severity},
};

/// Which half of the call a match was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Half {
    Request,
    Response,
}

/// How a match is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// Masked, with a keyed hash.
    Redacted(Evidence),
    /// The matched text (rules with `evidence = "full"`).
    Text(String),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MatchRecord {
    pub rule: String,
    pub category: Category,
    pub action: Action,
    pub severity: Severity,
    pub half: Half,
    pub scope: Scope,
    pub rationale: String,
    /// "name@version" of the rule's pack.
    pub pack: String,
    pub evidence: Kept,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoded_from: Option<Encoding>,
    /// Responses: ms from the response's first byte to the chunk the match completed in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<f64>,
    /// A match of the learned classifier (`rules::classifier`): its score and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelScore>,
}

/// What the classifier said of the text it matched.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelScore {
    /// Probability of prompt injection or jailbreak (of the text's highest window).
    pub score: f32,
    /// The threshold in force (`rules.classifier_threshold`).
    pub threshold: f32,
    /// The n-grams that raised the score most, with their share of the logit: an
    /// explanation an analyst can check against the text.
    pub features: Vec<(String, f32)>,
}

/// Which stage of inspection reached a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A rule of a rulepack.
    Rules,
    /// The learned classifier (`model` says which).
    Model,
    /// Anything else: provider allowlists, an operator's block, uninspectable content.
    Policy,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub action: Action,
    pub severity: Option<Severity>,
    /// Matched rule ids, strongest first, each once.
    pub rules: Vec<String>,
    /// The rationale of the deciding (strongest) match.
    pub rationale: Option<String>,
    /// The pack of the deciding match (the model, when the classifier decided).
    pub decided_by: Option<PackInfo>,
    /// The stage of the deciding match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// The classifier in force when the call was inspected (name, version, digest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PackInfo>,
    /// Every pack in force when the call was inspected.
    pub packs: Vec<PackInfo>,
    pub matches: Vec<MatchRecord>,
    /// False when some content could not be inspected; `not_scanned` says what and why.
    pub scan_complete: bool,
    pub not_scanned: Vec<String>,
    /// For a response: ms from its first byte to the chunk in which the decision's
    /// action was reached (for streams, when the offending text arrived).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_decided_at_ms: Option<f64>,
    /// Emergency mode was in force for the caller and turned this call's warn into block.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub escalated_by_emergency: bool,
}

/// Matches per call kept at most (the rest are counted in `not_scanned`).
const MAX_MATCHES: usize = 64;

/// Collects the findings of one call as they are found.
#[derive(Default)]
pub struct DecisionBuilder {
    matches: Vec<MatchRecord>,
    dropped_matches: usize,
    not_scanned: Vec<String>,
    /// (rule, matched text) pairs already recorded: a stream rescans an overlap window.
    seen: std::collections::HashSet<(usize, String)>,
    /// The classifier in force.
    model: Option<PackInfo>,
}

impl DecisionBuilder {
    pub fn add(
        &mut self,
        engine: &Engine,
        redactor: &Redactor,
        finding: Finding,
        half: Half,
        scope: Scope,
        at_ms: Option<f64>,
    ) {
        if !self.seen.insert((finding.rule, finding.matched.clone())) {
            return;
        }
        if self.matches.len() >= MAX_MATCHES {
            self.dropped_matches += 1;
            return;
        }
        let rule = engine.rule(finding.rule);
        let pack = engine.rule_pack(finding.rule);
        let evidence = match rule.evidence {
            EvidenceMode::Redacted => Kept::Redacted(redactor.evidence(&finding.matched)),
            EvidenceMode::Full => Kept::Text(finding.matched.clone()),
        };
        self.matches.push(MatchRecord {
            rule: rule.id.clone(),
            category: rule.category,
            action: rule.action,
            severity: rule.severity,
            half,
            scope,
            rationale: rule.rationale.clone(),
            pack: format!("{}@{}", pack.name, pack.version),
            evidence,
            decoded_from: finding.decoded_from,
            at_ms,
            model: None,
        });
    }

    /// The classifier in force for this call, for the decision's `model` and `decided_by`.
    pub fn set_model(&mut self, model: Option<PackInfo>) {
        self.model = model;
    }

    /// The strongest action among the matches so far, with its rule (first found wins a tie).
    pub fn strongest(&self) -> Option<(Action, &str)> {
        let mut best: Option<&MatchRecord> = None;
        for m in &self.matches {
            if best.is_none_or(|b| m.action > b.action) {
                best = Some(m);
            }
        }
        best.map(|m| (m.action, m.rule.as_str()))
    }

    /// Something of the call could not be inspected, and why.
    pub fn not_scanned(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        if !self.not_scanned.contains(&reason) {
            self.not_scanned.push(reason);
        }
    }

    /// Whether a match of rule `id` is recorded already.
    pub fn has_rule(&self, id: &str) -> bool {
        self.matches.iter().any(|m| m.rule == id)
    }

    /// A policy finding that is not a content match (provider/model allowlist).
    pub fn add_record(&mut self, record: MatchRecord) {
        if self.matches.len() < MAX_MATCHES {
            self.matches.push(record);
        } else {
            self.dropped_matches += 1;
        }
    }

    /// The decision. `emergency`: emergency mode is on for the caller, so a warn becomes a
    /// block (the matches keep their own actions; `escalated_by_emergency` says why).
    pub fn finish(mut self, engine: &Engine, emergency: bool) -> Decision {
        if self.dropped_matches > 0 {
            self.not_scanned.push(format!("matches_over_cap:{}", self.dropped_matches));
        }
        // Strongest first: action, then severity.
        self.matches.sort_by_key(|m| std::cmp::Reverse((m.action, m.severity)));
        let top = self.matches.first();
        let mut rules: Vec<String> = Vec::new();
        for m in &self.matches {
            if !rules.contains(&m.rule) {
                rules.push(m.rule.clone());
            }
        }
        let rule_pack = top.and_then(|m| engine.packs().iter().find(|p| format!("{}@{}", p.name, p.version) == m.pack));
        let stage = top.map(|m| match (&m.model, rule_pack) {
            (Some(_), _) => Stage::Model,
            (None, Some(_)) => Stage::Rules,
            (None, None) => Stage::Policy,
        });
        let decided_by = match stage {
            Some(Stage::Model) => self.model.clone(),
            _ => rule_pack.cloned(),
        };
        let mut action = top.map_or(Action::Allow, |m| m.action);
        let escalated_by_emergency = emergency && action == Action::Warn;
        if escalated_by_emergency {
            action = Action::Block;
        }
        // The earliest response chunk that carried a match of the deciding action.
        let deciding = top.map_or(Action::Allow, |m| m.action);
        let response_decided_at_ms = self
            .matches
            .iter()
            .filter(|m| m.half == Half::Response && m.action == deciding)
            .filter_map(|m| m.at_ms)
            .min_by(f64::total_cmp);
        Decision {
            action,
            severity: top.map(|m| m.severity),
            rationale: top.map(|m| {
                if escalated_by_emergency {
                    format!("emergency mode: warn escalated to block; {}", m.rationale)
                } else {
                    m.rationale.clone()
                }
            }),
            rules,
            decided_by,
            stage,
            model: self.model,
            packs: engine.packs().to_vec(),
            scan_complete: self.not_scanned.is_empty(),
            not_scanned: self.not_scanned,
            response_decided_at_ms,
            escalated_by_emergency,
            matches: self.matches,
        }
    }
}
