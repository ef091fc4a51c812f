//! The enforcement mode: whether the rules' verdicts act on live traffic, or are only
//! recorded.
//!
//! - **observe** (the shipped default): every call is inspected and recorded exactly as in
//!   enforce mode, decision included (`action: block` stays `block`); a rule's `block` adds
//!   an `enforcement` to the call's record with `outcome: "observed"`, naming the rule,
//!   and the connection is left alone. A fresh install thus kills nothing on its first
//!   false positive; the records show what enforce mode would have stopped.
//! - **enforce**: a rule's `block` ends the call's connection (`outcome:
//!   "connection_killed"`).
//!
//! In both modes the operator's own actions act, because whoever types them means it:
//! `block` and `disable` (kernel rules and call-by-call stops), and `emergency on`: in its
//! scope, rule verdicts of `warn` and `block` stop calls while it is on.
//!
//! # Which mode is in force
//!
//! `enforce.mode` in the config is the mode the agent starts in. `aegis-agent enforce
//! on|off` switches it at run time; the choice is saved in the state file with who made it,
//! when, and what the config said at that moment. At the next start, the most recent
//! decision wins ([`ModeState::at_start`]):
//!
//! - no saved choice: the config's mode;
//! - a choice made while the config said what it says now: the operator's choice (a
//!   restart or a crash does not undo an incident responder's switch);
//! - a choice made while the config said otherwise: the config was edited after the
//!   choice, so the config is the newer decision; the choice is dropped, and the audit log
//!   says so.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::blocks::Actor;
use crate::clock::rfc3339_ms;

/// Whether rule verdicts act on live traffic (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforceMode {
    /// Rule verdicts are recorded, not enforced.
    #[default]
    Observe,
    /// A rule's `block` ends the call's connection.
    Enforce,
}

impl EnforceMode {
    /// The mode's name, as the config and the records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::Enforce => "enforce",
        }
    }
}

impl fmt::Display for EnforceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator's `aegis-agent enforce on|off`, kept in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChoice {
    pub mode: EnforceMode,
    pub set_by: Actor,
    /// RFC 3339 UTC.
    pub set_at: String,
    pub set_unix_ms: u64,
    /// The config's `enforce.mode` when the choice was made: a config that says otherwise
    /// at a later start was edited since, and wins.
    pub config_mode: EnforceMode,
}

/// The mode in force and where it comes from: the config, or an operator's choice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeState {
    /// The mode in force: the operator's choice when there is one, else the config's.
    pub mode: EnforceMode,
    /// The config's `enforce.mode`.
    pub configured: EnforceMode,
    /// The operator's choice in force; absent: the config decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<ModeChoice>,
}

impl ModeState {
    /// The state at start, from the config's mode and the choice saved by an earlier run
    /// (see the module documentation). Also returns the saved choice when the config was
    /// edited since and so replaced it.
    pub fn at_start(configured: EnforceMode, saved: Option<ModeChoice>) -> (Self, Option<ModeChoice>) {
        match saved {
            Some(choice) if choice.config_mode == configured => {
                (Self { mode: choice.mode, configured, operator: Some(choice) }, None)
            }
            replaced => (Self { mode: configured, configured, operator: None }, replaced),
        }
    }

    /// The operator `actor` sets `mode` at `now_ms`. Returns whether the mode in force
    /// changed; when it did not, nothing is recorded.
    pub fn choose(&mut self, mode: EnforceMode, actor: &Actor, now_ms: u64) -> bool {
        if self.mode == mode {
            return false;
        }
        self.operator = Some(ModeChoice {
            mode,
            set_by: actor.clone(),
            set_at: rfc3339_ms(now_ms),
            set_unix_ms: now_ms,
            config_mode: self.configured,
        });
        self.mode = mode;
        true
    }
}

impl fmt::Display for ModeState {
    /// `observe (the config's enforce.mode)`, or `enforce (set by root (uid 0, pid 7 bash)
    /// at 2026-12-01T10:00:00.000000Z; the config says observe)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.operator {
            None => write!(f, "{} (the config's enforce.mode)", self.mode),
            Some(c) => {
                write!(f, "{} (set by {} at {}; the config says {})", self.mode, c.set_by, c.set_at, self.configured)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Actor {
        Actor { uid: 0, gid: 0, pid: 7, comm: "bash".into(), user: Some("root".into()) }
    }

    fn choice(mode: EnforceMode, config_mode: EnforceMode) -> ModeChoice {
        ModeChoice { mode, set_by: root(), set_at: rfc3339_ms(1000), set_unix_ms: 1000, config_mode }
    }

    use EnforceMode::{Enforce, Observe};

    #[test]
    fn the_config_decides_when_no_choice_was_saved() {
        for configured in [Observe, Enforce] {
            let (state, replaced) = ModeState::at_start(configured, None);
            assert_eq!(state, ModeState { mode: configured, configured, operator: None });
            assert_eq!(replaced, None);
        }
    }

    #[test]
    fn a_saved_choice_survives_a_restart_under_the_same_config() {
        let saved = choice(Enforce, Observe);
        let (state, replaced) = ModeState::at_start(Observe, Some(saved.clone()));
        assert_eq!(state, ModeState { mode: Enforce, configured: Observe, operator: Some(saved) });
        assert_eq!(replaced, None);
        assert_eq!(
            state.to_string(),
            "enforce (set by root (uid 0, pid 7 bash) at 1970-01-01T00:00:01.000000Z; the config says observe)"
        );
    }

    #[test]
    fn a_config_edited_after_the_choice_wins() {
        // The operator switched back to observe under an observe config; the config was then
        // changed to enforce: the config is the newer decision.
        let saved = choice(Observe, Observe);
        let (state, replaced) = ModeState::at_start(Enforce, Some(saved.clone()));
        assert_eq!(state, ModeState { mode: Enforce, configured: Enforce, operator: None });
        assert_eq!(replaced, Some(saved));
        assert_eq!(state.to_string(), "enforce (the config's enforce.mode)");
    }

    #[test]
    fn choosing_the_mode_in_force_records_nothing() {
        let (mut state, _) = ModeState::at_start(Observe, None);
        assert!(!state.choose(Observe, &root(), 5000));
        assert_eq!(state.operator, None);

        assert!(state.choose(Enforce, &root(), 5000));
        assert_eq!(state.mode, Enforce);
        assert_eq!(
            state.operator,
            Some(ModeChoice { set_at: rfc3339_ms(5000), set_unix_ms: 5000, ..choice(Enforce, Observe) })
        );
        assert!(!state.choose(Enforce, &root(), 6000), "already enforce");
        assert_eq!(state.operator.as_ref().map(|c| c.set_unix_ms), Some(5000), "the first choice is kept");

        // Back to the config's mode: still the operator's choice (who and when stay shown).
        assert!(state.choose(Observe, &root(), 7000));
        assert_eq!(
            (state.mode, state.operator.as_ref().map(|c| (c.mode, c.config_mode))),
            (Observe, Some((Observe, Observe)))
        );
    }

    #[test]
    fn wire_names() {
        assert_eq!(serde_json::to_string(&Observe).unwrap(), "\"observe\"");
        assert_eq!(serde_json::to_string(&Enforce).unwrap(), "\"enforce\"");
        assert_eq!(Enforce.to_string(), "enforce");
        let state = ModeState::at_start(Observe, Some(choice(Enforce, Observe))).0;
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["mode"], "enforce");
        assert_eq!(json["configured"], "observe");
        assert_eq!(json["operator"]["set_by"]["uid"], 0);
        assert_eq!(serde_json::from_value::<ModeState>(json).unwrap(), state);
        let plain = serde_json::to_value(ModeState::default()).unwrap();
        assert!(plain.get("operator").is_none(), "{plain}");
    }
}
