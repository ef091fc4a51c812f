//! Capture stage (in progress).
