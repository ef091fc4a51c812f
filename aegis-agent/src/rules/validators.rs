//! Checks that a regex match must also pass. (STUB: interface only.)

/// Luhn checksum over the digits of `s` (other characters such as spaces and dashes are
/// ignored); false for fewer than 12 or more than 19 digits.
pub fn luhn(s: &str) -> bool {
    let _ = s;
    false
}

/// IBAN: country code, check digits, length per country, mod-97 == 1. Spaces ignored.
pub fn iban(s: &str) -> bool {
    let _ = s;
    false
}

/// Shannon entropy of `s` in bits per character.
pub fn shannon_entropy(s: &str) -> f64 {
    let _ = s;
    0.0
}

/// A JWT: three base64url parts, the first two decode to JSON objects, the header has
/// "alg".
pub fn jwt(s: &str) -> bool {
    let _ = s;
    false
}
