//! Throughput of the classifier's scoring, per core, optimised, with nothing but the
//! scoring module (`cargo xtask eval detection` builds it with `rustc -O`).
//!
//! Usage: bench MODEL TEXTS: scores each line of TEXTS (the held-out JSON lines, taken as
//! text) and 1 KiB slices of it, single-threaded, for about 2 s each.

#[allow(dead_code)]
#[path = "../../aegis-agent/src/rules/classifier.rs"]
mod classifier;

use std::time::{Duration, Instant};

fn run(model: &classifier::Model, texts: &[&str]) -> (f64, f64) {
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    let (mut n, mut sink) = (0u64, 0f32);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        for t in texts {
            sink += model.score(t).score;
        }
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    let mb_s = (bytes as f64 * n as f64) / secs / 1e6;
    let us_per_text = secs * 1e6 / (n as f64 * texts.len() as f64);
    (mb_s, us_per_text)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = classifier::Model::parse(&std::fs::read(&args[1]).expect("model file")).expect("model");
    let data = std::fs::read_to_string(&args[2]).expect("texts");
    let lines: Vec<&str> = data.lines().collect();
    let (mb_s, us) = run(&model, &lines);
    println!("held-out lines ({} texts, {} bytes): {mb_s:.1} MB/s per core, {us:.1} µs per text", lines.len(), data.len());
    let kib: Vec<&str> = data
        .as_bytes()
        .chunks(1024)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    let (mb_s, us) = run(&model, &kib);
    println!("1 KiB texts ({}): {mb_s:.1} MB/s per core, {us:.1} µs per KiB", kib.len());
}
