//! AegisPlane's capture object: the OpenSSL probes that copy plaintext to the agent. The
//! programs copy and tag bytes and never parse them. Nothing else lives in this object, so
//! that capture loads (and fails) on its own: the content gate and the connect programs are
//! objects of their own (`gate_main.rs`, `enforce_main.rs`).
#![no_std]
#![no_main]

mod openssl;
mod runtime;
