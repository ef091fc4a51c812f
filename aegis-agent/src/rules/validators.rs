//! Checks that a regex match must also pass, to tell a real card number, IBAN, token or
//! secret from text that merely has its shape.
//!
//! They run only on regex matches (short strings), so they favour plain code over speed, but
//! none allocates more than its input or does more than linear work. They accept the
//! normalised text the engine matches on: IBAN letters may be lower case. JWTs are
//! case-sensitive base64url, so [`jwt`] needs the match as it was before lower-casing (for
//! ASCII text the span is the same in the input and in the normalised text).
//!
//! base64 comes from the `base64` crate (also used by normalisation): its URL-safe engine
//! without padding is exactly what RFC 7515 specifies for JWT parts, and it rejects
//! non-canonical trailing bits, which a hand-rolled decoder would have to get right too.

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

/// Luhn checksum over the ASCII digits of `s` (other characters, such as the spaces and
/// dashes that group card numbers, are ignored); false for fewer than 12 or more than 19
/// digits.
pub fn luhn(s: &str) -> bool {
    let mut digits = 0;
    let mut sum = 0;
    let from_right = s.bytes().rev().filter(u8::is_ascii_digit).map(|b| u32::from(b - b'0'));
    for (i, d) in from_right.enumerate() {
        // Every second digit from the right is doubled, and 2d - 9 is the sum of its digits.
        sum += match i % 2 {
            0 => d,
            _ if d > 4 => 2 * d - 9,
            _ => 2 * d,
        };
        digits = i + 1;
    }
    (12..=19).contains(&digits) && sum % 10 == 0
}

/// IBAN lengths per country, from the SWIFT IBAN registry: every SEPA country and the other
/// registered ones.
#[rustfmt::skip]
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24), (b"AE", 23), (b"AL", 28), (b"AT", 20), (b"AZ", 28), (b"BA", 20), (b"BE", 16),
    (b"BG", 22), (b"BH", 22), (b"BI", 27), (b"BR", 29), (b"BY", 28), (b"CH", 21), (b"CR", 22),
    (b"CY", 28), (b"CZ", 24), (b"DE", 22), (b"DJ", 27), (b"DK", 18), (b"DO", 28), (b"EE", 20),
    (b"EG", 29), (b"ES", 24), (b"FI", 18), (b"FK", 18), (b"FO", 18), (b"FR", 27), (b"GB", 22),
    (b"GE", 22), (b"GI", 23), (b"GL", 18), (b"GR", 27), (b"GT", 28), (b"HN", 28), (b"HR", 21),
    (b"HU", 28), (b"IE", 22), (b"IL", 23), (b"IQ", 23), (b"IS", 26), (b"IT", 27), (b"JO", 30),
    (b"KW", 30), (b"KZ", 20), (b"LB", 28), (b"LC", 32), (b"LI", 21), (b"LT", 20), (b"LU", 20),
    (b"LV", 21), (b"LY", 25), (b"MC", 27), (b"MD", 24), (b"ME", 22), (b"MK", 19), (b"MN", 20),
    (b"MR", 27), (b"MT", 31), (b"MU", 30), (b"NI", 28), (b"NL", 18), (b"NO", 15), (b"OM", 23),
    (b"PK", 24), (b"PL", 28), (b"PS", 29), (b"PT", 25), (b"QA", 29), (b"RO", 24), (b"RS", 22),
    (b"RU", 33), (b"SA", 24), (b"SC", 31), (b"SD", 18), (b"SE", 24), (b"SI", 19), (b"SK", 24),
    (b"SM", 27), (b"SO", 23), (b"ST", 25), (b"SV", 28), (b"TL", 23), (b"TN", 24), (b"TR", 26),
    (b"UA", 29), (b"VA", 22), (b"VG", 24), (b"XK", 20), (b"YE", 30),
];

/// IBAN (ISO 13616): a known country code, two check digits, alphanumerics up to the
/// country's length, and mod 97 == 1 over the rearranged number. Spaces are ignored, letters
/// may be lower case.
pub fn iban(s: &str) -> bool {
    let iban: Vec<u8> = s.bytes().filter(|&b| b != b' ').map(|b| b.to_ascii_uppercase()).collect();
    let [c1, c2, k1, k2, ..] = iban[..] else {
        return false;
    };
    let known = IBAN_LENGTHS.iter().any(|&(country, len)| *country == [c1, c2] && len == iban.len());
    if !known || !k1.is_ascii_digit() || !k2.is_ascii_digit() || !iban.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    // The country code and check digits move to the end, letters count as 10..=35; the
    // remainder is carried digit by digit so that no big integer is needed.
    let remainder = iban[4..].iter().chain(&iban[..4]).fold(0u32, |r, &b| match b {
        b'0'..=b'9' => (r * 10 + u32::from(b - b'0')) % 97,
        _ => (r * 100 + u32::from(b - b'A') + 10) % 97,
    });
    remainder == 1
}

/// Shannon entropy of `s` in bits per character (0 for the empty string).
pub fn shannon_entropy(s: &str) -> f64 {
    let mut counts = HashMap::new();
    for c in s.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let total = counts.values().sum::<usize>() as f64;
    // Σ p·log2(1/p): with 1/p rather than -log2(p), one symbol gives +0.0, not -0.0.
    counts.values().fold(0.0, |h, &n| {
        let p = n as f64 / total;
        h + p * (1.0 / p).log2()
    })
}

/// A JWT (RFC 7519, compact JWS): three base64url parts without padding separated by '.';
/// the first two decode to JSON objects, the header has a string "alg"; the signature may
/// be empty only when "alg" is "none". `s` must not be lower-cased.
pub fn jwt(s: &str) -> bool {
    let mut parts = s.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some(header) = json_object(header) else {
        return false;
    };
    let Some(alg) = header.get("alg").and_then(serde_json::Value::as_str) else {
        return false;
    };
    if json_object(payload).is_none() {
        return false;
    }
    if signature.is_empty() { alg == "none" } else { URL_SAFE_NO_PAD.decode(signature).is_ok() }
}

fn json_object(part: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// Spanish DNI ("12345678Z") or NIE ("X1234567L"): eight digits (a NIE's X/Y/Z prefix
/// stands for 0/1/2) and the control letter of their value mod 23. Spaces and dashes
/// are ignored; case is not significant.
pub fn es_dni(s: &str) -> bool {
    const LETTERS: &[u8; 23] = b"TRWAGMYFPDXBNJZSQVHLCKE";
    let chars: Vec<u8> = s.bytes().filter(|b| !matches!(b, b' ' | b'-')).map(|b| b.to_ascii_uppercase()).collect();
    let Some((&letter, body)) = chars.split_last() else { return false };
    let digits: Vec<u8> = match body.first() {
        Some(p @ b'X'..=b'Z') => std::iter::once(b'0' + (p - b'X')).chain(body[1..].iter().copied()).collect(),
        _ => body.to_vec(),
    };
    if digits.len() != 8 || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = digits.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    LETTERS[(n % 23) as usize] == letter
}

/// The ASCII digits of `s` as values 0..=9 (separators dropped).
fn digits(s: &str) -> Vec<u32> {
    s.bytes().filter(u8::is_ascii_digit).map(|b| u32::from(b - b'0')).collect()
}

/// Card numbers the payment networks publish for testing (Stripe, Adyen, Braintree and
/// PayPal documentation): Luhn-valid, never issued to a cardholder.
const TEST_CARDS: &[&str] = &[
    "4111111111111111",
    "4242424242424242",
    "4012888888881881",
    "4000056655665556",
    "4222222222222",
    "5555555555554444",
    "5105105105105100",
    "5200828282828210",
    "5500000000000004",
    "2223003122003222",
    "378282246310005",
    "371449635398431",
    "378734493671000",
    "6011111111111117",
    "6011000990139424",
    "30569309025904",
    "38520000023237",
    "3056930009020004",
    "36227206271667",
    "3566002020360505",
    "3530111333300000",
    "6200000000000005",
];

/// One of the payment networks' published test card numbers ([`TEST_CARDS`]); separators
/// are ignored.
pub fn test_card(s: &str) -> bool {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    TEST_CARDS.contains(&d.as_str())
}

/// A card number that may be real: Luhn-valid and not a published test number.
pub fn live_card(s: &str) -> bool {
    luhn(s) && !test_card(s)
}

/// French social security number (NIR, "numéro INSEE"): 13 characters (the department
/// may be Corsica's `2A`/`2B`) and a 2-digit key, 97 - (number mod 97); the Corsican
/// departments count as 19 (2A) and 18 (2B). Spaces are ignored.
pub fn fr_nir(s: &str) -> bool {
    let mut c: Vec<u8> = s.bytes().filter(|&b| b != b' ').map(|b| b.to_ascii_uppercase()).collect();
    if c.len() != 15 {
        return false;
    }
    match &c[5..7] {
        b"2A" => c[5..7].copy_from_slice(b"19"),
        b"2B" => c[5..7].copy_from_slice(b"18"),
        _ => {}
    }
    if !c.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = c[..13].iter().fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
    let key = u64::from(c[13] - b'0') * 10 + u64::from(c[14] - b'0');
    97 - n % 97 == key
}

/// German tax id (Steuerliche Identifikationsnummer): 11 digits, no leading zero; in the
/// first ten, exactly one digit occurs twice or three times (three times never in a row)
/// and the others at most once; the last is the ISO 7064 MOD 11,10 check digit.
pub fn de_steuer_id(s: &str) -> bool {
    let d = digits(s);
    if d.len() != 11 || d[0] == 0 {
        return false;
    }
    let mut counts = [0u8; 10];
    for &x in &d[..10] {
        counts[x as usize] += 1;
    }
    let repeated: Vec<u8> = counts.iter().copied().filter(|&n| n > 1).collect();
    if repeated.len() != 1 || repeated[0] > 3 || counts.iter().any(|&n| n > 3) {
        return false;
    }
    if repeated[0] == 3 && d[..10].windows(3).any(|w| w[0] == w[1] && w[1] == w[2]) {
        return false;
    }
    let mut product = 10;
    for &x in &d[..10] {
        let mut sum = (x + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let check = (11 - product) % 10;
    check == d[10]
}

/// Italian tax code (codice fiscale) of a person: 16 characters whose last is the check
/// letter of the first 15 (odd and even positions weighted by the Ministry's tables).
/// Case is not significant.
pub fn it_codice_fiscale(s: &str) -> bool {
    #[rustfmt::skip]
    const ODD: [u32; 26] = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23];
    let c: Vec<u8> = s.bytes().map(|b| b.to_ascii_uppercase()).collect();
    if c.len() != 16 || !c.iter().all(u8::is_ascii_alphanumeric) || !c[15].is_ascii_uppercase() {
        return false;
    }
    let mut sum = 0;
    for (i, &b) in c[..15].iter().enumerate() {
        // Digits count as the letter of the same index (0 = A).
        let v = if b.is_ascii_digit() { u32::from(b - b'0') } else { u32::from(b - b'A') };
        sum += if i % 2 == 0 { ODD[v as usize] } else { v };
    }
    u32::from(c[15] - b'A') == sum % 26
}

/// Indian Aadhaar number: 12 digits, the first 2-9, the last a Verhoeff check digit.
pub fn aadhaar(s: &str) -> bool {
    #[rustfmt::skip]
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    #[rustfmt::skip]
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    let d = digits(s);
    if d.len() != 12 || d[0] < 2 {
        return false;
    }
    let c = d.iter().rev().enumerate().fold(0u8, |c, (i, &x)| D[c as usize][P[i % 8][x as usize] as usize]);
    c == 0
}

/// Brazilian individual taxpayer number (CPF): 11 digits, not all the same, whose last two
/// are mod-11 check digits of the ones before.
pub fn br_cpf(s: &str) -> bool {
    let d = digits(s);
    if d.len() != 11 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let check = |n: usize| {
        let sum: u32 = d[..n].iter().enumerate().map(|(i, &x)| x * (n as u32 + 1 - i as u32)).sum();
        let r = sum * 10 % 11;
        if r == 10 { 0 } else { r }
    };
    check(9) == d[9] && check(10) == d[10]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn national_ids_with_check_digits() {
        // France: 2 55 08 14 168 025 key 38; in Corsica (2A) the key counts 19 for 2A.
        assert!(fr_nir("255081416802538"));
        assert!(fr_nir("2 55 08 14 168 025 38"));
        assert!(!fr_nir("255081416802539"));
        assert!(fr_nir("18004 2A 123456 68"), "Corsica 2A");
        assert!(!fr_nir("18004 2A 123456 38"));
        assert!(!fr_nir("25508141680253"));
        // Germany: the Federal Central Tax Office's published sample ids.
        assert!(de_steuer_id("86095742719"));
        assert!(de_steuer_id("47 036 892 816"));
        assert!(!de_steuer_id("86095742718"), "check digit");
        assert!(!de_steuer_id("12345678903"), "no digit repeated");
        assert!(!de_steuer_id("06095742719"), "leading zero");
        // Italy: the Agenzia delle Entrate's sample, and a changed check letter.
        assert!(it_codice_fiscale("RSSMRA85T10A562S"));
        assert!(it_codice_fiscale("rssmra85t10a562s"));
        assert!(!it_codice_fiscale("RSSMRA85T10A562T"));
        assert!(!it_codice_fiscale("RSSMRA85T10A562"));
        // India: Verhoeff.
        assert!(aadhaar("2341 2341 2346"));
        assert!(!aadhaar("2341 2341 2345"));
        assert!(!aadhaar("1341 2341 2341"), "starts with 0 or 1");
        // Brazil.
        assert!(br_cpf("529.982.247-25"));
        assert!(br_cpf("52998224725"));
        assert!(!br_cpf("529.982.247-24"));
        assert!(!br_cpf("111.111.111-11"), "all digits the same");
        // Test card numbers are Luhn-valid, but not live.
        assert!(test_card("4111 1111 1111 1111") && luhn("4111 1111 1111 1111"));
        assert!(!live_card("4242-4242-4242-4242"));
        assert!(live_card("4539 1488 0343 6467") && !test_card("4539 1488 0343 6467"));
    }

    #[test]
    fn spanish_dni_and_nie() {
        assert!(es_dni("12345678Z"));
        assert!(es_dni("12345678-z"));
        assert!(es_dni("X1234567L"));
        assert!(es_dni("y 1234567 x"));
        assert!(!es_dni("12345678A"), "wrong control letter");
        assert!(!es_dni("1234567Z"), "seven digits");
        assert!(!es_dni("W1234567L"));
        assert!(!es_dni(""));
    }

    #[test]
    fn luhn_accepts_valid_card_numbers_only() {
        assert!(luhn("4111111111111111"));
        assert!(luhn("4111 1111 1111 1111"));
        assert!(luhn("4111-1111-1111-1111"));
        assert!(luhn("5555555555554444"));
        assert!(luhn("378282246310005")); // Amex, 15 digits
        assert!(!luhn("4111111111111112"));
        assert!(!luhn("4111111111111121")); // another digit changed
        // Luhn-valid, but too short or too long for a card number.
        assert!(!luhn("00000000000")); // 11 digits
        assert!(luhn("000000000000")); // 12 digits
        assert!(luhn("0000000000000000000")); // 19 digits
        assert!(!luhn("00000000000000000000")); // 20 digits
        assert!(!luhn(""));
    }

    #[test]
    fn iban_checks_country_length_and_mod_97() {
        assert!(iban("GB82 WEST 1234 5698 7654 32"));
        assert!(iban("gb82west12345698765432"));
        assert!(iban("DE89370400440532013000"));
        assert!(iban("NO9386011117947")); // shortest, 15
        assert!(iban("FR1420041010050500013M02606")); // a letter in the account number
        assert!(!iban("DE89370400440532013001")); // changed digit
        assert!(!iban("GB82 WEST 1234 5698 7654 23")); // swapped digits
        assert!(!iban("DE8937040044053201300")); // one character short
        assert!(!iban("ZZ89370400440532013000")); // no such country
        assert!(!iban("DE8X370400440532013000")); // check digits must be digits
        assert!(!iban("DE89-3704-0044-0532-0130-00"));
        assert!(!iban("DE8"));
        assert!(!iban(""));
    }

    #[test]
    fn shannon_entropy_in_bits_per_char() {
        assert_eq!(shannon_entropy(""), 0.0);
        assert_eq!(shannon_entropy("aaaa"), 0.0);
        assert_eq!(shannon_entropy("ab"), 1.0);
        assert_eq!(shannon_entropy("abcd"), 2.0);
        assert_eq!(shannon_entropy("ééàà"), 1.0); // characters, not bytes
        // p = 3/4, 1/4: 0.8112781244591328 bits.
        assert!((shannon_entropy("aaab") - 0.811_278_124_459_132_8).abs() < 1e-12);
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn jwt_needs_json_header_with_alg_and_json_payload() {
        let header = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64(r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#);
        let signature = URL_SAFE_NO_PAD.encode([0xA5u8; 32]);
        assert!(jwt(&format!("{header}.{payload}.{signature}")));

        // Unsigned tokens: an empty signature only with "alg":"none".
        assert!(jwt(&format!("{}.{payload}.", b64(r#"{"alg":"none"}"#))));
        assert!(!jwt(&format!("{header}.{payload}.")));

        assert!(!jwt(&format!("{}.{payload}.{signature}", b64(r#"{"typ":"JWT"}"#))));
        assert!(!jwt(&format!("{}.{payload}.{signature}", b64(r#"{"alg":256}"#))));
        assert!(!jwt(&format!("{header}.{}.{signature}", b64("[1,2,3]"))));
        assert!(!jwt(&format!("{header}.{}.{signature}", b64("not json"))));
        assert!(!jwt(&format!("{header}.{payload}.{signature}.{signature}")));
        assert!(!jwt(&format!("{header}.{payload}")));
        assert!(!jwt(&format!("{header}.{payload}.{signature}=")));
        // Lower-cased by normalisation: no longer decodes to JSON.
        assert!(!jwt(&format!("{header}.{payload}.{signature}").to_lowercase()));
        assert!(!jwt("eyJhbGciOiJIUzI1NiJ9.garbage.sig"));
        assert!(!jwt(""));
    }
}
