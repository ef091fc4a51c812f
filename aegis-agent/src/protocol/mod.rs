//! HTTP/1.1 and HTTP/2 over the plaintext of one TLS connection: incremental message
//! parsing ([`http1`]), HTTP/2 frames and HPACK ([`http2`]), content decoding with a hard
//! output cap ([`encoding`]), and Server-Sent Events ([`sse`]). Pure functions over bytes:
//! no kernel, no I/O, testable alone.
//!
//! Everything here treats its input as hostile: each bound is explicit, and every byte
//! that is not parsed is accounted for in an error or a counter, never silently lost.

pub mod encoding;
pub mod http1;
pub mod http2;
pub mod sse;
