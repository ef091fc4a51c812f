//! `aegis-agent rules test PACK...`: load, validate and compile the packs together, then
//! run every rule's positive and negative examples.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::rules::{
    self,
    engine::{self, ExampleFailure},
};

/// Returns the failures (empty: every example behaved as declared). A pack that does not
/// load is an error naming its file, line and rule.
pub fn test(packs: &[PathBuf]) -> anyhow::Result<Vec<ExampleFailure>> {
    let engine = rules::load_engine(packs)?;
    let failures = engine::test_examples(&engine);
    let rules = engine.rules().count();
    let examples: usize = engine.rules().map(|r| r.examples.positive.len() + r.examples.negative.len()).sum();
    for p in engine.packs() {
        println!("pack {} {} ({})", p.name, p.version, p.digest);
    }
    for f in &failures {
        let kind = if f.positive { "positive example did not match" } else { "negative example matched" };
        println!("FAIL {}: {kind}: {:?}", f.rule, f.example);
    }
    println!("{rules} rules, {examples} examples, {} failed", failures.len());
    Ok(failures)
}

/// Replay incident bundles kept as regression cases against `packs` (the embedded default
/// pack when none): every harmful call of every case must not be allowed. The failures, as
/// "case: call" lines.
pub fn test_cases(
    packs: &[PathBuf],
    cases: &[PathBuf],
    key: &crate::evidence::key::VerifierKey,
) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let scratch = std::env::temp_dir().join(format!("aegis-rules-test-{}", std::process::id()));
    let packs: Vec<PathBuf> = if packs.is_empty() {
        // The embedded pack, written out for the replay's loader.
        std::fs::create_dir_all(&scratch)?;
        let path = scratch.join("default.toml");
        std::fs::write(&path, rules::DEFAULT_PACK)?;
        vec![path]
    } else {
        packs.to_vec()
    };
    let result = replay_cases(&packs, cases, key, &mut failures);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| failures)
}

fn replay_cases(
    packs: &[PathBuf],
    cases: &[PathBuf],
    key: &crate::evidence::key::VerifierKey,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    for case in cases {
        let r = crate::evidence::replay::replay(case, key, packs, &[])
            .with_context(|| format!("case {}", case.display()))?;
        for id in &r.still_allowed {
            println!("FAIL case {}: harmful call {id} is allowed", case.display());
            failures.push(format!("{}: {id}", case.display()));
        }
        for id in &r.not_redecided {
            println!("FAIL case {}: harmful call {id} has no payload to re-decide", case.display());
            failures.push(format!("{}: {id} (no payload)", case.display()));
        }
        println!("case {}: {} calls replayed, {} still allowed", case.display(), r.rows.len(), r.still_allowed.len());
    }
    Ok(())
}
