//! gitleaks configs as rulepacks (`rules::gitleaks`), and its Go-to-Rust regex translation.
//!
//! Invariants: a config is converted or rejected with the file and a line within the text;
//! every converted rule is a `secret` rule with a regex, within the pack limits; the
//! engine compiles the result or names the rule it rejects; the regex translation leaves
//! a pattern without escapes and classes unchanged.
#![no_main]

use std::path::Path;

use aegis_agent::rules::{
    engine::Engine,
    gitleaks,
    normalize::NormalizeLimits,
    pack::{self, Category, Direction, Scope},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    gitleaks::looks_like_gitleaks(text);
    for line in text.lines() {
        let rust = gitleaks::go_regex_to_rust(line);
        if !line.contains(['\\', '[']) {
            assert_eq!(rust, line, "nothing to translate");
        }
    }
    let source = Path::new("gitleaks.toml");
    let pack = match gitleaks::parse(text, source) {
        Ok(pack) => pack,
        Err(e) => {
            assert_eq!(e.file, source);
            let lines = text.lines().count() + 1;
            assert!(e.line.is_none_or(|l| (1..=lines).contains(&l)), "line {:?} of {lines}: {e}", e.line);
            return;
        }
    };
    assert_eq!(pack.version, "gitleaks");
    let regexes: usize =
        pack.rules.iter().map(|r| 1 + r.matcher.allow_regexes.len() + r.matcher.allow_match_regexes.len()).sum();
    assert!(regexes <= pack::MAX_REGEXES_PER_PACK, "{regexes} regexes accepted");
    for r in &pack.rules {
        assert_eq!((r.category, r.direction), (Category::Secret, Direction::Both));
        assert!(r.matcher.regex.is_some(), "rule {} has no regex", r.id);
    }
    match Engine::compile(vec![pack], NormalizeLimits::default()) {
        Ok(engine) => {
            let mut findings = Vec::new();
            engine.scan(data, Direction::Request, Scope::User, &mut findings);
            engine.scan(
                b"AKIAZ7Q4M2LXWP3KERTD ghp_4Fq8ZtX1mB7cK2pL9sV3nW6yR0dJ5hG8aQ2e",
                Direction::Both,
                Scope::Text,
                &mut findings,
            );
        }
        Err(e) => assert!(e.rule.is_some(), "an engine error names its rule: {e}"),
    }
});
