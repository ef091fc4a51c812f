//! AegisPlane agent library. Modules are layered: each imports only those listed before
//! it (see README "Architecture"), tests aside.
//!
//! Bottom modules every stage may use: [`clock`] (kernel and wall time, RFC 3339),
//! [`cgroup`] (cgroup v2 paths and scopes), [`net`] (the one CIDR type, `Host` forms),
//! [`files`] (reading a file an operator named: regular files only, capped, never
//! blocking), [`journal`] (append-only JSON lines files that stay whole through a full disk
//! or a crash; the [`journal::Ledger`] trait the decision log is seen through),
//! [`kernel`] (the eBPF objects, what the kernel offers them, what each capability came
//! to), [`failpoint`] (fault tests), [`sdnotify`] (systemd's readiness and watchdog
//! notifications).
//!
//! Then, in the order a call is handled:
//! - [`protocol`]: HTTP/1.1 messages, chunked bodies, content decoding, Server-Sent Events.
//! - [`rules`]: rulepacks and the scanning engine; the learned classifier (second stage).
//! - [`control`]: the operator's state (blocks, emergency and enforcement modes) and the
//!   control socket that changes it, with its audit log.
//! - [`policy`]: a call's inspection and decision, and its ruling (`policy::ruling`: the
//!   facts a call is decided from besides its content).
//! - [`llm`]: recognise model API calls, pair requests and responses, build one
//!   [`llm::CallRecord`] per call, join both ends of a local call.
//! - [`enforce`]: rule on a call and stop it (`enforce::verdict`, the one decision path),
//!   destination blocks and the content gate in the kernel.
//! - [`sinks`]: the typed [`sinks::record::Record`] every line is, stamped with the schema
//!   version and the agent's identity; stdout and the records file; OTLP spans.
//! - [`capture`]: the pipeline: load and attach the capture probes, read the ring buffer,
//!   rebuild each connection's streams, and drive the stages above on worker threads.
//! - [`metrics`]: the Prometheus `/metrics` and `/healthz` listener, counted from the
//!   records and read from capture's counters; capture health for `status` and the watchdog.
//! - [`evidence`]: the host signing key, the tamper-evident decision log (Merkle tree,
//!   signed checkpoints) and signed evidence envelopes (DSSE, in-toto); the spool that
//!   ships bundles to a collector.
//! - [`fleet`]: signed fleet policies (TUF-style: signers and a threshold, versions that
//!   only go up, expiry) and the agents' signed acknowledgements.
//! - [`collector`]: the server that receives bundles over mutual TLS, verifies them
//!   against enrolled agent keys, stores them (object_store) and indexes them (SQLite).
//! - [`drill`]: synthetic incidents run against the running agent, each phase of the
//!   playbook's flow checked and timed.
//! - [`daemon`], [`commands`]: the agent and the operator's commands.

pub mod capture;
pub mod cgroup;
pub mod clock;
pub mod collector;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod drill;
pub mod enforce;
pub mod evidence;
pub mod failpoint;
pub mod files;
pub mod fleet;
pub mod journal;
pub mod kernel;
pub mod llm;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod protocol;
pub mod rules;
pub mod sdnotify;
pub mod sinks;
