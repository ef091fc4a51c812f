//! AegisPlane's capture object. One module per probe family; each names the prototypes it
//! relies on. The programs copy and tag bytes and never parse them; the one exception is
//! the content gate (`sockmsg.rs`), which looks for a few literal keywords in what
//! SSL_write is given, so that the send can be refused before it leaves.
#![no_std]
#![no_main]

mod openssl;
mod runtime;
mod sockmsg;
