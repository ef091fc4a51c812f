//! AegisPlane's connect watch, an object of its own so that it loads and fails on its own:
//! the blind-spot report needs it, nothing else does.
#![no_std]
#![no_main]

mod runtime;
mod watch;
