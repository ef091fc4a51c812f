//! Server-Sent Events decoder (the `text/event-stream` format used by streamed model
//! responses). (STUB: interface only.)

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with '\n'.
    pub data: String,
}

/// Incremental decoder; events may be split anywhere across `push` calls.
pub struct SseDecoder {
    max_event_bytes: usize,
}

impl SseDecoder {
    /// `max_event_bytes`: an event larger than this is dropped and counted.
    pub fn new(max_event_bytes: usize) -> Self {
        Self { max_event_bytes }
    }

    pub fn push(&mut self, data: &[u8], out: &mut Vec<SseEvent>) {
        let _ = (data, out, self.max_event_bytes);
    }

    /// Flush a last event not followed by a blank line (stream ended).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        let _ = out;
    }

    /// Events dropped for being over the size bound.
    pub fn oversized_events(&self) -> u64 {
        0
    }
}
