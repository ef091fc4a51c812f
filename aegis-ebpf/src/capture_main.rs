//! AegisPlane's capture object: the TLS probes that copy plaintext to the agent (OpenSSL's
//! API, also GnuTLS's, in `openssl.rs`; Go's crypto/tls in `go_tls.rs`, sharing the ring
//! buffer and stream positions). The programs copy and tag bytes and never parse them.
//! Nothing else lives in this object, so that capture loads (and fails) on its own: the
//! content gate and the connect programs are objects of their own (`gate_main.rs`,
//! `enforce_main.rs`).
#![no_std]
#![no_main]

mod go_tls;
mod openssl;
mod runtime;
