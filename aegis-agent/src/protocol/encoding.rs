//! Content decoding (identity, gzip, deflate, br) with a hard cap on decoded bytes, so a
//! compression bomb costs at most the cap. (STUB: interface only.)

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content-encoding {0:?}")]
    Unsupported(String),
    #[error("corrupt {0} data")]
    Corrupt(&'static str),
}

/// Streaming decoder of one message body.
pub struct BodyDecoder {
    cap: usize,
}

impl BodyDecoder {
    /// `content_encoding` is the header value (may list several, applied in order);
    /// None or "identity" decodes nothing. `cap`: decoded bytes kept at most.
    pub fn new(content_encoding: Option<&[u8]>, cap: usize) -> Result<Self, DecodeError> {
        let _ = content_encoding;
        Ok(Self { cap })
    }

    /// Decode `input`, append the output to `out` (never past the cap in total).
    /// Returns the bytes appended.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, DecodeError> {
        let _ = (input, out, self.cap);
        Ok(0)
    }

    /// Decoded bytes that did not fit under the cap and were discarded (counted, not kept).
    pub fn over_cap(&self) -> u64 {
        0
    }
}
