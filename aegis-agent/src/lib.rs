//! AegisPlane agent library: the stages of the data path, one module each, in the order
//! the bytes travel (see README "Architecture").
//!
//! - [`capture`]: load the eBPF programs, attach them to TLS libraries, read the ring
//!   buffer, count drops, rebuild each connection's two byte streams.
//! - [`protocol`]: HTTP/1.1 messages, chunked bodies, content decoding, Server-Sent Events.
//! - [`llm`]: recognise model API calls and build one [`llm::CallRecord`] per call.
//! - [`sinks`]: where records go (stdout, JSON lines file).
//! - [`evidence`]: the host signing key, the tamper-evident decision log (Merkle tree,
//!   signed checkpoints) and signed evidence envelopes (DSSE, in-toto).
//!
//! Bottom modules every stage may use: [`files`] (reading a file an operator named:
//! regular files only, capped, never blocking), [`journal`] (append-only JSON lines files
//! that stay whole through a full disk or a crash), [`kernel`] (the eBPF objects, what the
//! kernel offers them, and what each capability came to), [`failpoint`] (fault tests).

pub mod capture;
pub mod collector;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod enforce;
pub mod evidence;
pub mod failpoint;
pub mod files;
pub mod journal;
pub mod kernel;
pub mod llm;
pub mod policy;
pub mod protocol;
pub mod rules;
pub mod sinks;
