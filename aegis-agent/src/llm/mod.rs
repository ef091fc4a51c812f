//! Model API calls: recognise them from the parsed HTTP exchange ([`detect`]), read their
//! usage from JSON or streamed bodies ([`usage`]), and describe each as one
//! [`CallRecord`] ([`record`]).

pub mod content;
pub mod correlate;
pub mod detect;
pub mod exchange;
pub mod http2;
pub mod json;
pub mod record;
pub mod response;
pub mod usage;

pub use record::CallRecord;
