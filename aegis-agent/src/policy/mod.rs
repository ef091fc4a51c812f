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

use std::sync::{Arc, RwLock};

use crate::rules::engine::Engine;

/// The rules in force and the evidence key, shared by every worker.
pub struct Inspector {
    engine: RwLock<Arc<Engine>>,
    pub redactor: redact::Redactor,
}

impl Inspector {
    pub fn new(engine: Engine, redactor: redact::Redactor) -> Self {
        Self { engine: RwLock::new(Arc::new(engine)), redactor }
    }

    /// The engine in force now. A call keeps the engine it started with, so a reload
    /// never changes the rules under a call in flight.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Put `engine` in force for calls that start from now on.
    pub fn replace(&self, engine: Engine) {
        *self.engine.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(engine);
    }
}
