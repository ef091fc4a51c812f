//! Text normalisation before matching. (STUB: interface only.)

/// Bounds on the work one text may cost.
#[derive(Clone, Copy, Debug)]
pub struct NormalizeLimits {
    /// Bytes of input normalised at most; the rest is scanned as is (and counted).
    pub max_input: usize,
    /// Encoded segments (base64, hex, percent) decoded per text at most.
    pub max_decoded_segments: usize,
    /// Shortest run considered an encoded segment.
    pub min_segment_len: usize,
}

impl Default for NormalizeLimits {
    fn default() -> Self {
        Self { max_input: 8 * 1024 * 1024, max_decoded_segments: 64, min_segment_len: 16 }
    }
}

/// How a decoded segment was encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Base64,
    Hex,
    Percent,
}

/// A segment of the input that decoded to text, scanned too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedSegment {
    pub encoding: Encoding,
    /// Byte range of the encoded segment in the *normalised* text.
    pub span: std::ops::Range<usize>,
    /// The decoded bytes, normalised like the rest (valid UTF-8, lossily).
    pub text: String,
}

/// The result of normalising one text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Normalized {
    /// NFKC, case-folded, zero-width and bidi controls removed, homoglyphs folded.
    /// Borrowed-equal to the input when it was already normal (ASCII lower case).
    pub text: String,
    pub decoded: Vec<DecodedSegment>,
    /// Input bytes past `max_input` that were not normalised.
    pub skipped_bytes: usize,
    /// Encoded segments not decoded because of `max_decoded_segments`.
    pub skipped_segments: usize,
}

/// Normalise `input` (invalid UTF-8 is replaced, U+FFFD).
pub fn normalize(input: &[u8], limits: &NormalizeLimits) -> Normalized {
    let _ = limits;
    Normalized { text: String::from_utf8_lossy(input).to_lowercase(), ..Default::default() }
}
