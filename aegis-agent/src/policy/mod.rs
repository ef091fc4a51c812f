//! Decisions: what the findings of a call mean (allow, warn, block, severity), and how
//! their evidence is kept without storing secrets.

pub mod redact;
