//! AegisPlane's capture object. One module per probe family; each names the prototypes it
//! relies on. The programs copy and tag bytes and never parse them.
#![no_std]
#![no_main]

mod openssl;
mod runtime;
