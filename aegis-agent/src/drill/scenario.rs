//! Drill scenarios: what a drill's synthetic incident is, as a TOML file teams can copy and
//! edit. The built-in ones (`packaging/drills/*.toml`) are embedded in the binary;
//! `aegis-agent drill scenarios` lists them and `drill show NAME` prints one.
//!
//! ```toml
//! [scenario]  name, title
//! [trigger]   api (openai | anthropic), model, prompt, stream, reply (ok | unsafe | unavailable)
//! [expect]    category (of the first signal), severity (SEV-1..3), classified_by (agent | operator)
//! [contain]   control (emergency | disable_model | disable_route | disable_tenant | fallback),
//!             validate (refused | redirected)
//! [recover]   prompt, model (default: the trigger's)
//! [policy]    allow_models, allow_providers (optional: the drill's own allowlist, applied by
//!             the agent to the drill cgroup only while the scenario runs)
//! ```

use serde::Deserialize;

use crate::evidence::bundle_meta::Severity;

/// The built-in scenarios, in the order a full drill runs them.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("prompt-injection", include_str!("../../../packaging/drills/prompt-injection.toml")),
    ("secret-leak", include_str!("../../../packaging/drills/secret-leak.toml")),
    ("unsafe-output", include_str!("../../../packaging/drills/unsafe-output.toml")),
    ("policy-drift", include_str!("../../../packaging/drills/policy-drift.toml")),
    ("provider-failover", include_str!("../../../packaging/drills/provider-failover.toml")),
];

/// Largest scenario file read.
const MAX_SCENARIO_BYTES: u64 = 64 * 1024;
/// Longest prompt or model name accepted.
const MAX_TEXT_BYTES: usize = 8 * 1024;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub scenario: About,
    pub trigger: Trigger,
    pub expect: Expect,
    pub contain: Contain,
    pub recover: Recover,
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// The drill's own provider/model allowlist (`control::drills::DrillPolicy`): the agent
/// rules the drill cgroup's calls against it while the scenario runs, and no other
/// process's; so drift is seen on a host whose packs have no `[[policies]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Model globs (`gpt-4o*`); empty: every model.
    #[serde(default)]
    pub allow_models: Vec<String>,
    /// Provider names as in call records; empty: every provider.
    #[serde(default)]
    pub allow_providers: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct About {
    pub name: String,
    pub title: String,
}

/// The API shape the drill client speaks.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI chat completions (`/v1/chat/completions`).
    Openai,
    /// Anthropic messages (`/v1/messages`).
    Anthropic,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Openai => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
        }
    }
}

/// What the drill endpoint answers (the primary; the fallback always answers `ok`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok,
    /// A private key in the answer (streamed in several chunks when the call streams).
    Unsafe,
    /// 503 (OpenAI shape) or 529 (Anthropic shape): the provider is down.
    Unavailable,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub api: Api,
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub stream: bool,
    pub reply: Reply,
}

/// Who classifies: the agent's incident rules, or the drill (as the operator would).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClassifiedBy {
    Agent,
    Operator,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The category of the first signal: a rule's (`prompt_injection`, `secret`,
    /// `unsafe_output`), `policy`, or `provider_error` (a 5xx answer).
    pub category: String,
    pub severity: Severity,
    pub classified_by: ClassifiedBy,
}

/// The control applied in the contain phase, always scoped to the drill's cgroup.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// `emergency on --cgroup DRILL`.
    Emergency,
    /// `disable model M` for the drill cgroup.
    DisableModel,
    /// `disable route HOST/PATH` for the drill cgroup.
    DisableRoute,
    /// `disable tenant DRILL`.
    DisableTenant,
    /// `block --dest PRIMARY --fallback FALLBACK` for the drill cgroup.
    Fallback,
}

/// How the contain phase is validated by the next synthetic call.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Validate {
    Refused,
    Redirected,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Contain {
    pub control: Control,
    pub validate: Validate,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recover {
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
}

impl Scenario {
    /// Parse and check a scenario; errors name the file and what to fix.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        let s: Scenario = toml::from_str(text).map_err(|e| anyhow::anyhow!("scenario {origin}: {e}"))?;
        let texts = [
            ("scenario.name", &s.scenario.name),
            ("trigger.model", &s.trigger.model),
            ("trigger.prompt", &s.trigger.prompt),
            ("recover.prompt", &s.recover.prompt),
        ];
        for (key, value) in texts.into_iter().chain(s.recover.model.iter().map(|m| ("recover.model", m))) {
            anyhow::ensure!(
                !value.is_empty() && value.len() <= MAX_TEXT_BYTES,
                "scenario {origin}: {key} must be 1 to {MAX_TEXT_BYTES} bytes"
            );
        }
        anyhow::ensure!(
            s.scenario.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "scenario {origin}: scenario.name may hold letters, digits, '-' and '_' only"
        );
        if let Some(p) = &s.policy {
            anyhow::ensure!(
                !(p.allow_models.is_empty() && p.allow_providers.is_empty()),
                "scenario {origin}: [policy] must list allow_models or allow_providers"
            );
            let policy = crate::control::drills::DrillPolicy {
                id: format!("drill.policy.{}", s.scenario.name),
                allow_providers: p.allow_providers.clone(),
                allow_models: p.allow_models.clone(),
            };
            policy.validate().map_err(|e| anyhow::anyhow!("scenario {origin}: [policy]: {e}"))?;
        }
        let shape_ok = match s.contain.control {
            Control::Fallback => s.contain.validate == Validate::Redirected,
            _ => s.contain.validate == Validate::Refused,
        };
        anyhow::ensure!(
            shape_ok,
            "scenario {origin}: contain.control = fallback is validated by redirected, every other control by refused"
        );
        Ok(s)
    }

    /// A built-in scenario by name.
    pub fn built_in(name: &str) -> anyhow::Result<Self> {
        let (_, text) = BUILT_IN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
            anyhow::anyhow!("no built-in scenario {name:?}: the built-in ones are {}", names.join(", "))
        })?;
        Self::parse(text, name)
    }

    /// A scenario file an operator wrote.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = crate::files::read_capped_to_string(path, MAX_SCENARIO_BYTES, "a scenario is a small TOML file")
            .map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The built-in text of `name`, for `drill show`.
    pub fn built_in_text(name: &str) -> Option<&'static str> {
        BUILT_IN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// The allowlist the agent applies to the drill cgroup while this scenario runs.
    pub fn drill_policy(&self) -> Option<crate::control::drills::DrillPolicy> {
        self.policy.as_ref().map(|p| crate::control::drills::DrillPolicy {
            id: format!("drill.policy.{}", self.scenario.name),
            allow_providers: p.allow_providers.clone(),
            allow_models: p.allow_models.clone(),
        })
    }

    /// The model of the recovery call.
    pub fn recover_model(&self) -> &str {
        self.recover.model.as_deref().unwrap_or(&self.trigger.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_scenario_parses_under_its_own_name() {
        for (name, text) in BUILT_IN {
            let s = Scenario::parse(text, name).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(&s.scenario.name, name);
        }
        assert_eq!(Scenario::built_in("secret-leak").unwrap().expect.severity, Severity::Sev1);
        let e = Scenario::built_in("nope").unwrap_err().to_string();
        assert!(e.contains("prompt-injection, secret-leak"), "{e}");
    }

    #[test]
    fn bad_scenarios_say_what_to_fix() {
        let good = Scenario::built_in_text("provider-failover").unwrap();
        let e = Scenario::parse(&good.replace("validate = \"redirected\"", "validate = \"refused\""), "f.toml");
        assert!(e.unwrap_err().to_string().contains("fallback is validated by redirected"));
        let e = Scenario::parse(&good.replace("api = \"openai\"", "api = \"gopher\""), "f.toml");
        assert!(e.unwrap_err().to_string().starts_with("scenario f.toml: "));
        let e = Scenario::parse(&good.replace("[recover]", "[recover]\nextra = 1"), "f.toml");
        assert!(e.unwrap_err().to_string().contains("extra"));
        let e = Scenario::parse(&format!("{good}\n[policy]\n"), "f.toml");
        assert!(e.unwrap_err().to_string().contains("must list allow_models"));
        let drift = Scenario::built_in("policy-drift").unwrap();
        let p = drift.drill_policy().expect("the drift scenario brings its allowlist");
        assert_eq!(p.id, "drill.policy.policy-drift");
        assert!(!p.allow_models.iter().any(|m| m == &drift.trigger.model));
        let e = Scenario::parse(&good.replace("name = \"provider-failover\"", "name = \"a b\""), "f.toml");
        assert!(e.unwrap_err().to_string().contains("letters, digits"));
    }
}
