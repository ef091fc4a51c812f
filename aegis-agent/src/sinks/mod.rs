//! Record sinks (in progress).
