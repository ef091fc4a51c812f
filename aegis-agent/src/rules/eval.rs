//! `cargo xtask eval detection`: recall and false-positive rate for the rules alone, the
//! model alone and both, on
//! - the held-out split (`tools/classifier/data/heldout.jsonl`: a quarter of each family's
//!   templates, stratified by family, no template on both sides; scored here by the
//!   embedded model), and
//! - the families-out split (`heldout_families.jsonl`: whole families no model saw; its
//!   scores are the trainer's second model's, which is not shipped, with that model's
//!   threshold from `metrics.json`; the rules run here).
//!
//! Writes `report.md` and `pr.tsv` (score, label and rules verdict per held-out row, for
//! the precision-recall curve xtask draws) into `$AEGIS_EVAL_OUT` (default
//! `target/eval-detection`). An ignored test, so the lint and test runs do not pay for it.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

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

/// One row's verdicts: (family, attack, rules fired, model score).
type Row = (String, bool, bool, f32);

fn table(out: &mut String, rows: &[Row], threshold: f32) {
    let mut total = Counts::default();
    let mut by_family: BTreeMap<&str, Counts> = BTreeMap::new();
    for (family, attack, rules, score) in rows {
        let model = *score >= threshold;
        let fired = [*rules, model, *rules || model];
        for counts in [&mut total, by_family.entry(family).or_default()] {
            if *attack {
                counts.attacks += 1;
            } else {
                counts.benign += 1;
            }
            for (i, f) in fired.iter().enumerate() {
                if *f && *attack {
                    counts.hits[i] += 1;
                } else if *f {
                    counts.false_pos[i] += 1;
                }
            }
        }
    }
    let _ = writeln!(out, "{} attacks, {} benign texts; model threshold {threshold:.3}\n", total.attacks, total.benign);
    let _ = writeln!(out, "| stage | recall (attacks caught) | false positives (benign flagged) |");
    let _ = writeln!(out, "|---|---|---|");
    for (i, name) in ["rules alone", "model alone", "rules + model"].iter().enumerate() {
        let _ = writeln!(
            out,
            "| {name} | {} ({}/{}) | {} ({}/{}) |",
            pct(total.hits[i], total.attacks),
            total.hits[i],
            total.attacks,
            pct(total.false_pos[i], total.benign),
            total.false_pos[i],
            total.benign
        );
    }
    let _ = writeln!(out, "\nBy family: recall for attack families, false positives for benign ones.\n");
    let _ = writeln!(out, "| family | kind | n | rules | model | rules + model |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (family, c) in &by_family {
        let (kind, n, k) = if c.attacks > 0 { ("recall", c.attacks, c.hits) } else { ("FP", c.benign, c.false_pos) };
        let _ = writeln!(out, "| {family} | {kind} | {n} | {} | {} | {} |", pct(k[0], n), pct(k[1], n), pct(k[2], n));
    }
}

#[test]
#[ignore = "an evaluation, run by `cargo xtask eval detection`"]
fn detection() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/classifier/data");
    let out_dir = std::env::var_os("AEGIS_EVAL_OUT")
        .map_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/eval-detection")), PathBuf::from);
    std::fs::create_dir_all(&out_dir).unwrap();
    let engine = load_engine(&[]).unwrap();
    let c = Classifier::embedded(None, Action::Warn).unwrap();
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/metrics.json")).expect("metrics.json")).unwrap();
    let mut findings = Vec::new();
    let mut read = |file: &str, rescore: bool| -> Vec<Row> {
        let data = std::fs::read_to_string(format!("{dir}/{file}"))
            .unwrap_or_else(|e| panic!("{dir}/{file}: {e}: run `cargo xtask train-detector` first"));
        data.lines()
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                let text = row["text"].as_str().unwrap();
                findings.clear();
                engine.scan(text.as_bytes(), Direction::Request, Scope::User, &mut findings);
                let rules = findings
                    .iter()
                    .any(|f| matches!(engine.rule(f.rule).category, Category::PromptInjection | Category::Jailbreak));
                let score = if rescore { c.model.score(text).score } else { row["score"].as_f64().unwrap() as f32 };
                (row["family"].as_str().unwrap().to_owned(), row["label"] == 1, rules, score)
            })
            .collect()
    };
    let held = read("heldout.jsonl", true);
    let families = read("heldout_families.jsonl", false);

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Detection evaluation\n\nModel `{}` {} {}, {} KiB; rules: the default pack (prompt injection and \
         jailbreak categories).\n",
        crate::rules::classifier::MODEL_NAME,
        c.model.version,
        c.model.digest,
        crate::rules::DEFAULT_MODEL.len() / 1024
    );
    let _ = writeln!(
        report,
        "## Held-out split\n\nA quarter of each family's templates (or written texts), chosen by hash; no \
         template is on both sides. Threshold set on the training split's benign texts (out-of-fold), not \
         here. Scored by the embedded model, in Rust.\n"
    );
    table(&mut report, &held, c.threshold);
    let fo = &metrics["families_out"];
    let _ = writeln!(
        report,
        "\n## Families left out (harder)\n\nWhole families no model saw in training: {}. Model scores: the \
         trainer's second model, trained without them (not shipped), at its own threshold; rules run here.\n",
        fo["families"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    table(&mut report, &families, fo["threshold"].as_f64().unwrap_or(0.5) as f32);
    let _ = writeln!(report, "\n## Precision-recall\n\n![precision-recall](pr.png)\n");
    print!("{report}");
    std::fs::write(out_dir.join("report.md"), &report).unwrap();
    let mut tsv = format!("# threshold {}\n", c.threshold);
    for (_, attack, rules, score) in &held {
        let _ = writeln!(tsv, "{score}\t{}\t{}", u8::from(*attack), u8::from(*rules));
    }
    std::fs::write(out_dir.join("pr.tsv"), tsv).unwrap();
}
