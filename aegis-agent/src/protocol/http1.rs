//! Incremental HTTP/1.1 parser for one direction of one connection. (STUB: interface only.)

use bytes::Bytes;

/// Bounds applied to hostile input.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line / status line + all header lines, in bytes.
    pub max_head_bytes: usize,
    /// Number of header fields.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_head_bytes: 64 * 1024, max_headers: 128 }
    }
}

/// Which kind of message this byte stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Requests,
    Responses,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Lower-cased field name.
    pub name: String,
    /// Raw value bytes, surrounding whitespace trimmed.
    pub value: Bytes,
}

/// Request line or status line and the header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHead {
    /// Requests only.
    pub method: Option<String>,
    /// Requests only: the request target as sent (origin-form, or absolute-form).
    pub target: Option<String>,
    /// Responses only.
    pub status: Option<u16>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<Header>,
    /// Bytes of the head on the wire (start line + headers + blank line).
    pub wire_len: usize,
}

impl MessageHead {
    /// First value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| &h.value[..])
    }
}

/// Why the parser gave up on the stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed start line")]
    BadStartLine,
    #[error("malformed header line")]
    BadHeader,
    #[error("head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("malformed chunked encoding")]
    BadChunk,
    #[error("bytes missing from the capture")]
    Gap,
}

/// What the parser found, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpEvent {
    /// A message starts.
    Head(MessageHead),
    /// Body bytes, de-chunked but still content-encoded. Wire bytes, not copies of
    /// headers; may arrive in many pieces.
    Body(Bytes),
    /// The message ended. `complete` is false when it was cut short (connection ended,
    /// capture gap) before its declared length.
    End { complete: bool },
    /// The stream cannot be parsed from here on; `skipped` counts the bytes discarded
    /// so far in this resync (the parser looks for the next start line).
    Error { error: ParseError, skipped: u64 },
}

/// Incremental parser of one direction of an HTTP/1.1 connection.
pub struct Http1Parser {
    _kind: StreamKind,
}

impl Http1Parser {
    pub fn new(kind: StreamKind, limits: Limits) -> Self {
        let _ = limits;
        Self { _kind: kind }
    }

    /// Responses only: the next response answers a request with this method (HEAD and
    /// CONNECT responses have no body). Called once per request, in request order.
    pub fn expect_response_to(&mut self, method: &str) {
        let _ = method;
    }

    /// Parse `data`; push what was found to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<HttpEvent>) {
        let _ = (data, out);
    }

    /// `n` bytes are missing from the stream at this point (capture drop).
    pub fn gap(&mut self, n: u64, out: &mut Vec<HttpEvent>) {
        let _ = (n, out);
    }

    /// The connection ended: ends a close-delimited body, or a message cut short.
    pub fn finish(&mut self, out: &mut Vec<HttpEvent>) {
        let _ = out;
    }
}
