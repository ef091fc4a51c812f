//! `aegis-agent rules test PACK...`: load, validate and compile the packs together, then
//! run every rule's positive and negative examples.

use std::path::PathBuf;

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
