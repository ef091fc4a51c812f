//! `cargo xtask eval detection`: recall and false-positive rate on the classifier's
//! held-out split (`tools/classifier/data/heldout.jsonl`, whole families the model never
//! saw) for the rules alone, the model alone and both; an ignored test, so the lint and
//! test runs do not pay for it.

use std::collections::BTreeMap;

use super::{
    Classifier, load_engine,
    pack::{Action, Category, Direction, Scope},
};

#[derive(Default)]
struct Counts {
    attacks: usize,
    benign: usize,
    hits: [usize; 3],
    false_pos: [usize; 3],
}

fn pct(n: usize, d: usize) -> String {
    if d == 0 { "-".into() } else { format!("{:.1}%", 100.0 * n as f64 / d as f64) }
}

#[test]
#[ignore = "an evaluation, run by `cargo xtask eval detection`"]
fn detection() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/classifier/data/heldout.jsonl");
    let data = std::fs::read_to_string(path).expect("run tools/classifier/train.py first");
    let engine = load_engine(&[]).unwrap();
    let c = Classifier::embedded(None, Action::Warn).unwrap();
    let mut total = Counts::default();
    let mut by_family: BTreeMap<String, Counts> = BTreeMap::new();
    let mut findings = Vec::new();
    for line in data.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = row["text"].as_str().unwrap();
        let attack = row["label"] == 1;
        findings.clear();
        engine.scan(text.as_bytes(), Direction::Request, Scope::User, &mut findings);
        let rules = findings
            .iter()
            .any(|f| matches!(engine.rule(f.rule).category, Category::PromptInjection | Category::Jailbreak));
        let model = c.model.score(text).score >= c.threshold;
        let fired = [rules, model, rules || model];
        for counts in [&mut total, by_family.entry(row["family"].as_str().unwrap().to_owned()).or_default()] {
            if attack {
                counts.attacks += 1;
            } else {
                counts.benign += 1;
            }
            for (i, f) in fired.iter().enumerate() {
                if *f && attack {
                    counts.hits[i] += 1;
                } else if *f {
                    counts.false_pos[i] += 1;
                }
            }
        }
    }
    println!(
        "held-out split: {} attacks, {} benign; model {} {} threshold {:.3}",
        total.attacks, total.benign, c.model.version, c.model.digest, c.threshold
    );
    println!("| stage | recall | false positives |");
    println!("|---|---|---|");
    for (i, name) in ["rules alone", "model alone", "rules + model"].iter().enumerate() {
        println!(
            "| {name} | {} ({}/{}) | {} ({}/{}) |",
            pct(total.hits[i], total.attacks),
            total.hits[i],
            total.attacks,
            pct(total.false_pos[i], total.benign),
            total.false_pos[i],
            total.benign
        );
    }
    println!("\nby family (rules / model / both: recall for attacks, false positives for benign):");
    for (family, c) in &by_family {
        let (n, k) = if c.attacks > 0 { (c.attacks, c.hits) } else { (c.benign, c.false_pos) };
        println!("  {family:32} n={n:3}  {} / {} / {}", pct(k[0], n), pct(k[1], n), pct(k[2], n));
    }
}
