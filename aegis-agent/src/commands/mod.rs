//! Operator commands that run without the daemon: `scan` and `rules test`.

pub mod rules;
pub mod scan;
