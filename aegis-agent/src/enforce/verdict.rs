//! Acting on a call's verdict while the call is still on the wire.
//!
//! The exchange tracker raises a [`Checkpoint`] when a call's request is complete and
//! inspected, and again when its response's inspection reaches a stronger action (a
//! stream is inspected chunk by chunk). The worker that owns the connection has
//! [`Containment::rule`] rule on the call (the one place operator blocks, emergency mode,
//! the mode, the scope and the tenants' policies are matched: see `policy::ruling`), keeps
//! the ruling with the call for its record, and asks [`verdict`] whether the call must be
//! stopped, and why ([`StopReason`]):
//!
//! 1. a rule of the packs in force, or a tenant's provider policy, decided `block`, and
//!    the enforcement mode is enforce (`rule:<id>`);
//! 2. emergency mode is on for the caller and a rule decided `warn`, or `block` in observe
//!    mode (`emergency:<id>`): emergency mode enforces the rules in its scope in both modes;
//! 3. an operator's block (`aegis-agent block`/`disable`) covers the call: its model, its
//!    route (host + path prefix), its tenant (cgroup) or its provider, in the block's scope
//!    (`operator:<block id>`), in both modes.
//!
//! In observe mode ([`crate::control::mode`]) a rule's `block` outside emergency mode is a
//! [`Verdict`] that does not stop: the call goes on, and its record says in `enforcement`
//! that it would have been stopped, by which rule, with `outcome: "observed"`. The
//! decision itself is never changed by the mode.
//!
//! A stopped call's connection is ended at once ([`ConnectionKiller`]): the socket is
//! destroyed, so the application's next read or write fails and the server sees a reset.
//! The record of the call says what was done in `enforcement`, with the bytes that still
//! went out or came in after the verdict (the user-space path cannot be faster than the
//! ring buffer and a worker; the in-kernel gate, `enforce::gate`, stops literal matches
//! before any byte leaves).

use std::{path::Path, sync::Arc, time::Instant};

pub use crate::policy::ruling::{Checkpoint, Enforcement, Outcome};
use crate::{
    control::{ControlView, EnforceMode, Subject},
    policy::{
        Inspector,
        decision::Half,
        inspect::policy_records,
        ruling::{CallFacts, Ruling},
    },
    rules::pack::Action,
};

/// What `ruling` and the rules' strongest action so far (`rules`: action and rule) mean for
/// the call (see the module documentation for the order):
/// 1. a rule's or a policy's block in enforce mode stops it (`rule:<id>`);
/// 2. in emergency mode, a warn or block stops it in both modes (`emergency:<id>`);
/// 3. an operator's block stops it in both modes (`operator:<id>`);
/// 4. a block in observe mode is a verdict that does not stop (recorded as observed).
///
/// Outside the containment scope, nothing.
pub fn verdict(ruling: &Ruling, rules: Option<&(Action, String)>) -> Option<Verdict> {
    if !ruling.in_scope {
        return None;
    }
    let mode = ruling.mode;
    let verdict = |why, stop| Verdict { why, mode, stop };
    let rules = rules.map(|(a, r)| (*a, r.as_str()));
    let strongest = match (rules, ruling.policy_strongest()) {
        (Some(r), Some(p)) => Some(if p.0 > r.0 { p } else { r }),
        (r, p) => r.or(p),
    };
    let by_rules = match strongest {
        Some((Action::Block, rule)) if mode == EnforceMode::Enforce => {
            Some(verdict(StopReason::Rule(rule.into()), true))
        }
        Some((Action::Block | Action::Warn, rule)) if ruling.emergency => {
            Some(verdict(StopReason::Emergency(rule.into()), true))
        }
        Some((Action::Block, rule)) => Some(verdict(StopReason::Rule(rule.into()), false)),
        _ => None,
    };
    if by_rules.as_ref().is_some_and(|v| v.stop) {
        return by_rules;
    }
    match &ruling.block {
        Some(block) => {
            Some(verdict(StopReason::Operator { id: block.id.clone(), reason: block.spec.reason.clone() }, true))
        }
        None => by_rules,
    }
}

/// Why a call is stopped (or, observed, would be).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Rule(String),
    Operator { id: String, reason: String },
    Emergency(String),
}

impl StopReason {
    /// `rule:<id>`, `operator:<block id>`, `emergency:<rule id>`.
    pub fn label(&self) -> String {
        match self {
            StopReason::Rule(r) => format!("rule:{r}"),
            StopReason::Operator { id, .. } => format!("operator:{id}"),
            StopReason::Emergency(r) => format!("emergency:{r}"),
        }
    }
}

/// The judge's answer for a call that must stop, or would in enforce mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub why: StopReason,
    /// The enforcement mode in force when the call was judged.
    pub mode: EnforceMode,
    /// Whether the call's connection is ended; false for a rule's `block` in observe mode
    /// (outside emergency mode), which is recorded only.
    pub stop: bool,
}

/// Ends a connection, known by its process and TLS connection pointer.
pub trait ConnectionKiller: Send + Sync {
    /// Destroy the connection of `tgid` whose library connection object is `conn` (the
    /// request went to `host`, as its Host header said). Returns how many sockets died.
    fn kill(&self, tgid: u32, conn: u64, host: Option<&str>) -> Result<u32, String>;
}

/// Knows which provider a host belongs to, and learns the hosts calls go to.
pub trait HostBook: Send + Sync {
    /// A call went to `host` (a Host header, maybe with a port): learn it, and say its
    /// provider, if known.
    fn seen(&self, host: &str) -> Option<String>;
    /// The provider of `host`, if known (nothing learned).
    fn provider(&self, host: &str) -> Option<String>;
}

/// What the data path needs to stop calls: the operator's state (blocks, emergency mode,
/// enforcement mode) and a way to end connections. Empty (the default, containment not
/// loaded): observe mode, verdicts are recorded, never enforced.
#[derive(Clone, Default)]
pub struct Containment {
    pub view: Option<ControlView>,
    pub killer: Option<Arc<dyn ConnectionKiller>>,
    pub hosts: Option<Arc<dyn HostBook>>,
    /// Only callers in this cgroup v2 subtree (as /proc/PID/cgroup names it) are stopped:
    /// the subtree the containment programs are attached to. None: every caller.
    pub scope: Option<String>,
    /// The rules in force, for the tenants' provider and model allowlists.
    pub inspector: Option<Arc<Inspector>>,
    /// The drills in progress, for the allowlist a drill applies to its own cgroup.
    pub drills: Option<crate::control::drills::DrillMarks>,
}

/// The findings of a drill's own allowlist `p` (applied to its cgroup `drill_cgroup`) for
/// a call of `cgroup` to `provider`/`model`: those of a `[[policies]]` entry (category
/// policy, action block, SEV-3) of the pack `drill`.
fn drill_policy_records(
    p: &crate::control::drills::DrillPolicy,
    drill_cgroup: &str,
    cgroup: &str,
    provider: &str,
    model: Option<&str>,
) -> Vec<crate::policy::decision::MatchRecord> {
    use crate::rules::pack::{ProviderPolicy, Severity};
    let policy = ProviderPolicy {
        id: p.id.clone(),
        tenant: drill_cgroup.to_owned(),
        // Empty: every provider (this call's).
        allow_providers: if p.allow_providers.is_empty() {
            vec![provider.to_owned()]
        } else {
            p.allow_providers.clone()
        },
        allow_models: p.allow_models.clone(),
        action: Action::Block,
        severity: Severity::Sev3,
        rationale: "the drill's allowlist (aegis-agent drill, for its cgroup only while it runs)".into(),
        line: 0,
    };
    policy_records(&[("drill".to_owned(), policy)], cgroup, provider, model)
}

impl Containment {
    pub fn is_active(&self) -> bool {
        self.view.is_some() || self.killer.is_some() || self.hosts.is_some()
    }

    /// The enforcement mode in force: the operator's state, or observe without one.
    pub fn mode(&self) -> EnforceMode {
        self.view.as_ref().map_or(EnforceMode::Observe, ControlView::mode)
    }

    /// The provider of a call: by its host when the book knows it, else by the API's shape.
    /// The book learns the host at the call's checkpoint ([`Containment::rule`]); later
    /// lookups of the same call pass `learn = false`.
    pub fn provider_of(
        &self,
        host: Option<&str>,
        detected: &'static str,
        learn: bool,
    ) -> std::borrow::Cow<'static, str> {
        let known = match (host, &self.hosts) {
            (Some(h), Some(book)) if learn => book.seen(h),
            (Some(h), Some(book)) => book.provider(h),
            _ => None,
        };
        known.map_or(std::borrow::Cow::Borrowed(detected), std::borrow::Cow::Owned)
    }

    /// Rule on a call: the one place where operator blocks, emergency mode, the enforcement
    /// mode, the containment scope and the tenants' policies are matched against a call's
    /// facts (see `policy::ruling`). `learn`: the host book learns the call's host (at the
    /// request's checkpoint; later rulings of the same call pass false).
    pub fn rule(&self, facts: &CallFacts, learn: bool) -> Ruling {
        // Every call teaches the book its host, in scope or not.
        let provider = self.provider_of(facts.host, facts.provider, learn).into_owned();
        let in_scope = self.scope.as_deref().is_none_or(|scope| crate::cgroup::covers(scope, facts.cgroup));
        let (emergency, block) = match &self.view {
            Some(view) => {
                let subject = Subject {
                    provider: Some(&provider),
                    model: facts.model,
                    host: facts.host,
                    path: facts.path,
                    peer: None,
                    cgroup: facts.client.then_some(facts.cgroup),
                    exe: if facts.client { facts.exe } else { None },
                };
                (facts.client && view.emergency_applies_to(facts.cgroup), view.matching_block(&subject))
            }
            None => (false, None),
        };
        let mut policy = match (&self.inspector, facts.client) {
            (Some(inspector), true) => policy_records(&inspector.in_force().1, facts.cgroup, &provider, facts.model),
            _ => Vec::new(),
        };
        if facts.client
            && let Some(drills) = self.drills.as_ref().filter(|d| !d.is_empty())
            && let Some((cgroup, p)) = drills.policy_of(facts.cgroup)
        {
            policy.extend(drill_policy_records(&p, &cgroup, facts.cgroup, &provider, facts.model));
        }
        Ruling { mode: self.mode(), in_scope, emergency, block, provider, policy }
    }

    /// Whether the call at `cp`, made by a process in `cgroup` running `exe` (its client
    /// end), must stop, or would in enforce mode: [`Self::rule`], then [`verdict`].
    pub fn judge(&self, cp: &Checkpoint, cgroup: &str, exe: Option<&Path>) -> Option<Verdict> {
        let ruling = self.rule(&cp.facts(true, cgroup, exe), cp.half == Half::Request);
        verdict(&ruling, cp.rules.as_ref())
    }

    /// Act on `verdict` for the call at `cp`: end the connection `conn` of process `tgid`,
    /// or, observed, only say in the record what enforce mode would have done.
    pub fn act(&self, verdict: &Verdict, cp: &Checkpoint, tgid: u32, conn: u64) -> Enforcement {
        let why = &verdict.why;
        if !verdict.stop {
            let detail = if self.view.is_some() {
                "enforce.mode is observe: the rule's block is recorded, not enforced (`aegis-agent enforce on` \
                 enforces it)"
            } else {
                "containment is off (enforce.enabled = false): the rule's block is recorded, not enforced"
            };
            tracing::debug!(
                by = %why.label(), pid = tgid, host = cp.host.as_deref().unwrap_or("?"), path = %cp.path,
                "call observed: enforce mode would have stopped it"
            );
            return Enforcement {
                by: why.label(),
                half: cp.half,
                mode: verdict.mode,
                outcome: Outcome::Observed,
                detail: Some(detail.to_owned()),
                connections_killed: 0,
                verdict_to_kill_us: None,
                bytes_out_after_verdict: 0,
                bytes_in_after_verdict: 0,
            };
        }
        let started = Instant::now();
        let (outcome, detail, killed) = match &self.killer {
            None => (Outcome::KillFailed, Some("this agent has no way to end connections".to_owned()), 0),
            Some(k) => match k.kill(tgid, conn, cp.host.as_deref()) {
                Ok(0) => (Outcome::KillFailed, Some("no socket of the connection was found".to_owned()), 0),
                Ok(n) => (Outcome::ConnectionKilled, None, n),
                Err(e) => (Outcome::KillFailed, Some(e), 0),
            },
        };
        let now = crate::clock::monotonic_ns();
        let verdict_to_kill_us = now.saturating_sub(cp.ts) / 1000;
        match outcome {
            Outcome::ConnectionKilled => tracing::warn!(
                by = %why.label(), pid = tgid, host = cp.host.as_deref().unwrap_or("?"), path = %cp.path,
                kill_us = started.elapsed().as_micros() as u64, verdict_to_kill_us,
                "call stopped: connection destroyed"
            ),
            _ => tracing::warn!(
                by = %why.label(), pid = tgid, host = cp.host.as_deref().unwrap_or("?"), path = %cp.path,
                outcome = ?outcome, detail = detail.as_deref().unwrap_or(""),
                "call decided block but its connection was not destroyed"
            ),
        }
        Enforcement {
            by: why.label(),
            half: cp.half,
            mode: verdict.mode,
            outcome,
            detail,
            connections_killed: killed,
            verdict_to_kill_us: Some(verdict_to_kill_us),
            bytes_out_after_verdict: 0,
            bytes_in_after_verdict: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::control::{Actor, Block, BlockSpec, BlockTarget, ControlState, ModeState, Scope};

    fn cp(rules: Option<(Action, &str)>) -> Checkpoint {
        Checkpoint {
            exchange: 0,
            half: Half::Request,
            ts: 0,
            provider: "openai",
            model: Some("gpt-4o".into()),
            host: Some("api.openai.com".into()),
            path: "/v1/chat/completions".into(),
            rules: rules.map(|(a, r)| (a, r.to_owned())),
        }
    }

    /// Operator state in `mode`, with emergency mode on for `emergency` and a host-wide
    /// block of model `blocked` (block id `blk-00000001`).
    fn view(mode: EnforceMode, emergency: Option<&str>, blocked: Option<&str>) -> ControlView {
        let mut state = ControlState { mode: ModeState::at_start(mode, None).0, ..ControlState::default() };
        if let Some(cgroup) = emergency {
            state.emergency.set(true, Some(cgroup));
        }
        if let Some(model) = blocked {
            let spec = BlockSpec {
                target: BlockTarget::Model(model.into()),
                scope: Scope::Host,
                expires: None,
                fallback: None,
                reason: "unsafe".into(),
            };
            let actor = Actor { uid: 0, gid: 0, pid: 1, comm: "bash".into(), user: None };
            state.blocks.add(Block::new("blk-00000001".into(), spec, actor, 0).unwrap()).unwrap();
        }
        ControlView::new(state)
    }

    fn containment(view: ControlView) -> Containment {
        Containment { view: Some(view), ..Containment::default() }
    }

    fn rule(r: &str, mode: EnforceMode, stop: bool) -> Option<Verdict> {
        Some(Verdict { why: StopReason::Rule(r.into()), mode, stop })
    }

    use EnforceMode::{Enforce, Observe};

    /// The kill and the record come from one ruling: a tenant policy's block stops a call
    /// in enforce mode like a rule's (and is observed in observe mode), the stronger of the
    /// rules and the policies decides, and outside the containment scope nothing stops.
    #[test]
    fn a_policy_block_stops_like_a_rule_and_the_scope_bounds_everything() {
        use crate::{
            policy::decision::{Kept, MatchRecord},
            rules::pack::{Category, Scope as TextScope, Severity},
        };
        let policy = MatchRecord {
            rule: "policy.approved_providers".into(),
            category: Category::Policy,
            action: Action::Block,
            severity: Severity::Sev2,
            half: Half::Request,
            scope: TextScope::Text,
            rationale: "not an approved provider".into(),
            pack: "tenant@1".into(),
            evidence: Kept::Text("provider=openai".into()),
            decoded_from: None,
            at_ms: None,
            model: None,
        };
        let ruling = |mode, in_scope| Ruling {
            mode,
            in_scope,
            emergency: false,
            block: None,
            provider: "openai".into(),
            policy: vec![policy.clone()],
        };
        let by_policy = "policy.approved_providers";
        assert_eq!(verdict(&ruling(Enforce, true), None), rule(by_policy, Enforce, true));
        assert_eq!(verdict(&ruling(Observe, true), None), rule(by_policy, Observe, false));
        let warn = (Action::Warn, "r2".to_owned());
        assert_eq!(
            verdict(&ruling(Enforce, true), Some(&warn)),
            rule(by_policy, Enforce, true),
            "the stronger decides"
        );
        let block = (Action::Block, "r1".to_owned());
        assert_eq!(verdict(&ruling(Enforce, false), Some(&block)), None, "outside the scope");
        let clean = Ruling { policy: Vec::new(), ..ruling(Enforce, true) };
        assert_eq!(verdict(&clean, Some(&warn)), None);
    }

    /// A drill's allowlist rules its own cgroup's calls only, and only while it runs.
    #[test]
    fn a_drills_policy_rules_its_cgroup_only() {
        use crate::control::drills::{DrillMarks, DrillPolicy};
        let drills = DrillMarks::default();
        let c = Containment { drills: Some(drills.clone()), ..containment(view(Observe, None, None)) };
        let facts = |cgroup, model, client| crate::policy::ruling::CallFacts {
            client,
            provider: "openai_compatible",
            model: Some(model),
            host: Some("127.0.0.1:4443"),
            path: Some("/v1/chat/completions"),
            cgroup,
            exe: None,
        };
        let drill = "/t/aegis-drill-1";
        assert!(c.rule(&facts(drill, "drill-unapproved-model", true), false).policy.is_empty(), "no drill");
        let policy =
            DrillPolicy { id: "drill.policy.x".into(), allow_providers: vec![], allow_models: vec!["gpt-4o*".into()] };
        drills.begin("drill-1", drill, 0, Some(policy)).unwrap();
        let ruled = c.rule(&facts(drill, "drill-unapproved-model", true), false);
        let rules: Vec<(&str, &str)> = ruled.policy.iter().map(|m| (m.rule.as_str(), m.pack.as_str())).collect();
        assert_eq!(rules, [("drill.policy.x", "drill")]);
        assert_eq!(ruled.policy[0].action, Action::Block);
        assert!(c.rule(&facts("/t/aegis-drill-1/client", "gpt-4o-mini", true), false).policy.is_empty(), "approved");
        assert!(c.rule(&facts("/t/app", "drill-unapproved-model", true), false).policy.is_empty(), "real traffic");
        assert!(c.rule(&facts(drill, "drill-unapproved-model", false), false).policy.is_empty(), "server end");
        drills.end("drill-1");
        assert!(c.rule(&facts(drill, "drill-unapproved-model", true), false).policy.is_empty(), "ended");
    }

    #[test]
    fn rule_blocks_are_observed_in_observe_mode_and_stop_in_enforce_mode() {
        let block = cp(Some((Action::Block, "r1")));
        let warn = cp(Some((Action::Warn, "r2")));
        // Containment not loaded: observe.
        let none = Containment::default();
        assert_eq!(none.judge(&block, "/", None), rule("r1", Observe, false));
        assert_eq!(none.judge(&warn, "/", None), None);
        assert_eq!(none.judge(&cp(None), "/", None), None);

        let observe = containment(view(Observe, None, None));
        assert_eq!(observe.judge(&block, "/", None), rule("r1", Observe, false));
        assert_eq!(observe.judge(&warn, "/", None), None);

        let enforce = containment(view(Enforce, None, None));
        assert_eq!(enforce.judge(&block, "/", None), rule("r1", Enforce, true));
        assert_eq!(enforce.judge(&warn, "/", None), None);
        assert_eq!(enforce.judge(&cp(None), "/", None), None);
    }

    #[test]
    fn callers_outside_the_enforcement_scope_are_not_stopped() {
        let c = Containment { scope: Some("/app".into()), ..containment(view(Enforce, None, None)) };
        let block = cp(Some((Action::Block, "r1")));
        assert_eq!(c.judge(&block, "/app/worker", None), rule("r1", Enforce, true));
        assert_eq!(c.judge(&block, "/other", None), None);
        assert_eq!(c.judge(&block, "/app2", None), None);
    }

    #[test]
    fn emergency_mode_enforces_the_rules_in_its_scope_in_both_modes() {
        let block = cp(Some((Action::Block, "r1")));
        let warn = cp(Some((Action::Warn, "r2")));
        let emergency = |r: &str, mode| Some(Verdict { why: StopReason::Emergency(r.into()), mode, stop: true });

        let observe = containment(view(Observe, Some("/app"), None));
        assert_eq!(observe.judge(&block, "/app/job", None), emergency("r1", Observe));
        assert_eq!(observe.judge(&warn, "/app/job", None), emergency("r2", Observe));
        assert_eq!(observe.judge(&block, "/other", None), rule("r1", Observe, false), "outside: observed");
        assert_eq!(observe.judge(&warn, "/other", None), None);
        assert_eq!(observe.judge(&cp(None), "/app", None), None);

        // Enforce mode stops a block anyway: the rule is named; a warn is emergency's doing.
        let enforce = containment(view(Enforce, Some("/app"), None));
        assert_eq!(enforce.judge(&block, "/app", None), rule("r1", Enforce, true));
        assert_eq!(enforce.judge(&warn, "/app", None), emergency("r2", Enforce));
    }

    #[test]
    fn operator_blocks_act_in_observe_mode() {
        let operator = |mode| {
            Some(Verdict {
                why: StopReason::Operator { id: "blk-00000001".into(), reason: "unsafe".into() },
                mode,
                stop: true,
            })
        };
        let observe = containment(view(Observe, None, Some("gpt-4o")));
        assert_eq!(observe.judge(&cp(None), "/", None), operator(Observe));
        assert_eq!(observe.judge(&cp(Some((Action::Warn, "r2"))), "/", None), operator(Observe));
        // An observed rule verdict does not hide the operator's block.
        assert_eq!(observe.judge(&cp(Some((Action::Block, "r1"))), "/", None), operator(Observe));
        let other = Checkpoint { model: Some("gpt-4o-mini".into()), ..cp(Some((Action::Block, "r1"))) };
        assert_eq!(observe.judge(&other, "/", None), rule("r1", Observe, false));

        // In enforce mode the rule that stops the call anyway is named first.
        let enforce = containment(view(Enforce, None, Some("gpt-4o")));
        assert_eq!(enforce.judge(&cp(Some((Action::Block, "r1"))), "/", None), rule("r1", Enforce, true));
        assert_eq!(enforce.judge(&cp(None), "/", None), operator(Enforce));
    }

    /// Counts its calls; kills one socket each time.
    #[derive(Default)]
    struct Killer(AtomicU32);

    impl ConnectionKiller for Killer {
        fn kill(&self, _: u32, _: u64, _: Option<&str>) -> Result<u32, String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        }
    }

    #[test]
    fn an_observed_verdict_is_recorded_and_kills_nothing() {
        let killer = Arc::new(Killer::default());
        let c = Containment { killer: Some(killer.clone()), ..containment(view(Observe, None, None)) };
        let at = cp(Some((Action::Block, "r1")));
        let verdict = c.judge(&at, "/", None).unwrap();
        let e = c.act(&verdict, &at, 1, 2);
        assert_eq!(
            (e.outcome, e.by.as_str(), e.mode, e.connections_killed, e.verdict_to_kill_us),
            (Outcome::Observed, "rule:r1", Observe, 0, None)
        );
        assert_eq!(
            e.detail.as_deref(),
            Some(
                "enforce.mode is observe: the rule's block is recorded, not enforced (`aegis-agent enforce on` enforces it)"
            )
        );
        assert_eq!(killer.0.load(Ordering::SeqCst), 0, "no kill in observe mode");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!((json["outcome"].as_str(), json["mode"].as_str()), (Some("observed"), Some("observe")));
        assert!(json.get("verdict_to_kill_us").is_none(), "{json}");

        let c = Containment { killer: Some(killer.clone()), ..containment(view(Enforce, None, None)) };
        let e = c.act(&c.judge(&at, "/", None).unwrap(), &at, 1, 2);
        assert_eq!((e.outcome, e.mode, e.connections_killed), (Outcome::ConnectionKilled, Enforce, 1));
        assert!(e.verdict_to_kill_us.is_some());
        assert_eq!(killer.0.load(Ordering::SeqCst), 1);

        // Without containment loaded the detail says so.
        let e = Containment::default().act(&rule("r1", Observe, false).unwrap(), &at, 1, 2);
        assert_eq!(e.outcome, Outcome::Observed);
        assert!(e.detail.unwrap().starts_with("containment is off (enforce.enabled = false)"));
    }
}
