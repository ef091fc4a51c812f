//! Decisions: what the findings of a call mean (allow, warn, block, severity), and how
//! their evidence is kept without storing secrets.
//!
//! - [`Inspector`]: the rules in force (swapped whole on reload) and the evidence key.
//! - [`inspect`]: one call's inspection, request at once, response as it streams.
//! - [`decision`]: the resulting [`decision::Decision`].
//! - [`redact`]: masked evidence with a keyed hash.

pub mod allowlist;
pub mod decision;
pub mod inspect;
pub mod redact;
pub mod reload;
pub mod ruling;

use std::sync::{Arc, RwLock};

use crate::rules::{Classifier, PackPolicy, engine::Engine, pack::Action};

/// `enforce.uninspectable` when not configured (the shipped configuration says the same):
/// a call with content the rules could not see is decided `block`. Like any rule's block
/// it is only recorded in observe mode (the shipped mode), and stops the call in enforce
/// mode, where content must not get past the rules by being too large for them or by
/// arriving while capture loses events.
pub const UNINSPECTABLE_DEFAULT: Action = Action::Block;

/// The content rules and the provider allowlists of the packs in force, swapped together.
type InForce = (Arc<Engine>, Arc<[PackPolicy]>);

/// The rules in force and the evidence key, shared by every worker.
pub struct Inspector {
    current: RwLock<InForce>,
    /// The packs a fleet policy put in force, `(name, TOML)`, kept across reloads of the
    /// configured packs; and the lock that makes each reload one step.
    fleet_packs: RwLock<Vec<(String, String)>>,
    reloading: std::sync::Mutex<()>,
    pub redactor: redact::Redactor,
    /// What a call's decision says of content the rules could not see (`enforce.uninspectable`,
    /// see [`inspect::Unseen`]).
    pub uninspectable: Action,
    /// The learned second stage (`[rules] classifier`), when enabled: it scores the
    /// request's user and tool messages (and plain texts) after the rules.
    pub classifier: Option<Arc<Classifier>>,
}

impl Inspector {
    pub fn new(engine: Engine, redactor: redact::Redactor) -> Self {
        Self::with_policies(engine, Vec::new(), redactor)
    }

    pub fn with_policies(engine: Engine, policies: Vec<PackPolicy>, redactor: redact::Redactor) -> Self {
        Self {
            current: RwLock::new((Arc::new(engine), policies.into())),
            fleet_packs: RwLock::new(Vec::new()),
            reloading: std::sync::Mutex::new(()),
            redactor,
            uninspectable: UNINSPECTABLE_DEFAULT,
            classifier: None,
        }
    }

    /// Run the learned classifier on the texts it applies to (see `inspect`).
    pub fn with_classifier(mut self, classifier: Option<Classifier>) -> Self {
        self.classifier = classifier.map(Arc::new);
        self
    }

    /// Decide `action` for content the rules could not see (`enforce.uninspectable`).
    pub fn with_uninspectable(mut self, action: Action) -> Self {
        self.uninspectable = action;
        self
    }

    /// The engine in force now. A call keeps the engine it started with, so a reload
    /// never changes the rules under a call in flight.
    pub fn engine(&self) -> Arc<Engine> {
        self.in_force().0
    }

    /// Engine and allowlists in force now, read together.
    pub fn in_force(&self) -> InForce {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Put new rules in force for calls that start from now on.
    pub fn replace(&self, engine: Engine, policies: Vec<PackPolicy>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(engine), policies.into());
    }

    /// Compile the configured packs `paths` with the fleet's packs (`fleet`, or those in
    /// force when None) and put them in force, in one step; the packs in force after.
    /// Nothing changes on an error.
    pub fn reload(
        &self,
        paths: &[std::path::PathBuf],
        fleet: Option<Vec<(String, String)>>,
    ) -> Result<Vec<crate::rules::engine::PackInfo>, crate::rules::pack::PackError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let fleet = fleet.unwrap_or_else(|| self.fleet_packs.read().unwrap_or_else(|e| e.into_inner()).clone());
        let (engine, policies) = crate::rules::load_with(paths, &fleet)?;
        let packs = engine.packs().to_vec();
        self.replace(engine, policies);
        *self.fleet_packs.write().unwrap_or_else(|e| e.into_inner()) = fleet;
        Ok(packs)
    }
}
