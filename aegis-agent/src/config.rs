//! Agent configuration (in progress).
