//! Reading a model API response body as it arrives: decoded bytes become Server-Sent
//! Events, NDJSON lines or one JSON document, which give the usage summary and the
//! generated text (for rules) chunk by chunk.

use super::{
    detect::{ApiCall, ApiKind},
    usage::{ResponseSummary, UsageCollector},
};
use crate::{
    policy::inspect::{CallInspection, Unseen},
    protocol::{
        http1::MessageHead,
        sse::{SseDecoder, SseEvent},
    },
};

/// A single SSE event larger than this is dropped (counted).
const MAX_SSE_EVENT_BYTES: usize = 1024 * 1024;

enum Form {
    Sse {
        decoder: SseDecoder,
        events: Vec<SseEvent>,
    },
    /// Newline-delimited JSON; the bytes of an unfinished line.
    Ndjson(Vec<u8>),
    /// One JSON document, read at the end.
    Json(Vec<u8>),
}

pub struct ResponseReader {
    form: Form,
    usage: UsageCollector,
    /// Bytes kept at most for an unfinished NDJSON line or a JSON document.
    cap: usize,
    over_cap: u64,
}

impl ResponseReader {
    /// `cap` bounds the bytes kept for a JSON body or one NDJSON line, and the generated
    /// text held between two [`ResponseReader::take_text`] calls.
    pub fn new(call: &ApiCall, head: &MessageHead, cap: usize) -> Self {
        let content_type =
            head.header("content-type").map(|v| String::from_utf8_lossy(v).to_ascii_lowercase()).unwrap_or_default();
        let form = if content_type.starts_with("text/event-stream") {
            Form::Sse { decoder: SseDecoder::new(MAX_SSE_EVENT_BYTES), events: Vec::new() }
        } else if content_type.contains("ndjson")
            || (matches!(call.api, ApiKind::OllamaChat | ApiKind::OllamaGenerate) && call.stream)
        {
            Form::Ndjson(Vec::new())
        } else {
            Form::Json(Vec::new())
        };
        Self { form, usage: UsageCollector::new(call.api).capture_text(cap), cap, over_cap: 0 }
    }

    /// Decoded body bytes, in order.
    pub fn feed(&mut self, mut data: &[u8]) {
        match &mut self.form {
            Form::Sse { decoder, events } => {
                decoder.push(data, events);
                for e in events.drain(..) {
                    self.usage.on_sse(&e);
                }
            }
            Form::Ndjson(line) => {
                while let Some(nl) = memchr::memchr(b'\n', data) {
                    if line.is_empty() {
                        self.usage.on_json_line(&data[..nl]);
                    } else {
                        keep(line, &data[..nl], self.cap, &mut self.over_cap);
                        self.usage.on_json_line(line);
                        line.clear();
                    }
                    data = &data[nl + 1..];
                }
                keep(line, data, self.cap, &mut self.over_cap);
            }
            Form::Json(body) => keep(body, data, self.cap, &mut self.over_cap),
        }
    }

    /// The body ended (or was cut short): read what is left.
    fn finish(&mut self) {
        match &mut self.form {
            Form::Sse { decoder, events } => {
                decoder.finish(events);
                for e in events.drain(..) {
                    self.usage.on_sse(&e);
                }
            }
            Form::Ndjson(line) => {
                let line = std::mem::take(line);
                self.usage.on_json_line(&line);
            }
            Form::Json(body) => {
                let body = std::mem::take(body);
                self.usage.on_body(&body);
            }
        }
    }

    /// Generated text read since the last call.
    pub fn take_text(&mut self) -> String {
        self.usage.take_text()
    }

    pub fn summary(&self) -> &ResponseSummary {
        self.usage.summary()
    }

    /// The body ended (or was cut short): read what is left, give the rest of the text to
    /// `inspection` (`at_ms` after the response's first byte), and tell it what the rules
    /// did not see, or saw only as plain text. Returns the same, for the record's notes.
    /// The daemon and `aegis-agent scan` both end a response here.
    pub fn finish_into(&mut self, inspection: Option<&mut CallInspection>, at_ms: f64) -> Vec<String> {
        self.finish();
        let unread = self.unread();
        let as_text = self.read_as_text();
        if let Some(inspection) = inspection {
            inspection.response_text(&self.take_text(), at_ms);
            for note in &unread {
                inspection.uninspectable(Unseen::ResponseBody, note.clone());
            }
            if let Some(note) = &as_text {
                inspection.not_scanned(note.clone());
            }
        }
        unread.into_iter().chain(as_text).collect()
    }

    /// What of the body the rules did not see: events over the size bound, bytes past the
    /// cap, text past the bound between two takes.
    fn unread(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Form::Sse { decoder, .. } = &self.form
            && decoder.oversized_events() > 0
        {
            notes.push(format!("sse_events_over_size_cap:{}", decoder.oversized_events()));
        }
        if self.over_cap > 0 {
            notes.push(format!("response_bytes_not_kept:{}", self.over_cap));
        }
        if self.usage.text_dropped > 0 {
            notes.push(format!("response_text_not_inspected_bytes:{}", self.usage.text_dropped));
        }
        notes
    }

    /// What the rules saw only as plain text, without the API's structure (a body or
    /// events that were not JSON).
    fn read_as_text(&self) -> Option<String> {
        let raw = self.usage.raw_documents;
        (raw > 0).then(|| match self.form {
            Form::Json(_) => "response_body_not_json_scanned_as_text".to_owned(),
            Form::Sse { .. } | Form::Ndjson(_) => format!("response_events_not_json_scanned_as_text:{raw}"),
        })
    }
}

/// Append to `buf` up to `cap` bytes in total; count the rest.
fn keep(buf: &mut Vec<u8>, data: &[u8], cap: usize, over: &mut u64) {
    let take = cap.saturating_sub(buf.len()).min(data.len());
    buf.extend_from_slice(&data[..take]);
    *over += (data.len() - take) as u64;
}
