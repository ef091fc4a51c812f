//! The precision-recall curve of `cargo xtask eval detection`, drawn into a PNG with no
//! dependency: a small RGB canvas, lines and dots, written as an uncompressed (stored
//! deflate blocks) PNG. No text: the report's caption names the colours and axes.

use std::path::Path;

const W: usize = 640;
const H: usize = 480;
const MARGIN: usize = 40;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Self {
        Self { px: vec![[255, 255, 255]; W * H] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    /// Plot coordinates (0..=1 each) to pixels.
    fn at(x: f64, y: f64) -> (i64, i64) {
        let span = (W - 2 * MARGIN) as f64;
        let vspan = (H - 2 * MARGIN) as f64;
        ((MARGIN as f64 + x * span).round() as i64, ((H - MARGIN) as f64 - y * vspan).round() as i64)
    }

    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: [u8; 3], width: i64) {
        let (x0, y0) = Self::at(a.0, a.1);
        let (x1, y1) = Self::at(b.0, b.1);
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=steps {
            let x = x0 + (x1 - x0) * i / steps;
            let y = y0 + (y1 - y0) * i / steps;
            for dx in -(width / 2)..=(width / 2) {
                for dy in -(width / 2)..=(width / 2) {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    fn dot(&mut self, p: (f64, f64), c: [u8; 3], r: i64) {
        let (x, y) = Self::at(p.0, p.1);
        for dx in -r..=r {
            for dy in -r..=r {
                if dx * dx + dy * dy <= r * r {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(H * (1 + 3 * W));
        for row in self.px.chunks(W) {
            raw.push(0); // filter: none
            raw.extend(row.iter().flatten());
        }
        // zlib stream of stored blocks (at most 65535 bytes each).
        let mut z = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
        for (i, b) in blocks.iter().enumerate() {
            z.push(u8::from(i + 1 == blocks.len()));
            let n = b.len() as u16;
            z.extend(n.to_le_bytes());
            z.extend((!n).to_le_bytes());
            z.extend(*b);
        }
        let (mut a, mut s) = (1u32, 0u32);
        for &byte in &raw {
            a = (a + u32::from(byte)) % 65521;
            s = (s + a) % 65521;
        }
        z.extend(((s << 16) | a).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend((W as u32).to_be_bytes());
        ihdr.extend((H as u32).to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8 bits, RGB
        for (kind, data) in [(b"IHDR", ihdr), (b"IDAT", z), (b"IEND", Vec::new())] {
            out.extend((data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend(&data);
            out.extend(&body);
            out.extend(crc32(&body).to_be_bytes());
        }
        out
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// (recall, precision) over every threshold of `rows` (score, attack, rules fired); with
/// `with_rules`, a row fires if its rules did or its score reaches the threshold.
fn curve(rows: &[(f32, bool, bool)], with_rules: bool) -> Vec<(f64, f64)> {
    let attacks = rows.iter().filter(|r| r.1).count().max(1) as f64;
    let mut sorted = rows.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0usize, 0usize);
    if with_rules {
        for r in &sorted {
            if r.2 {
                if r.1 { tp += 1 } else { fp += 1 }
            }
        }
    }
    let mut out = Vec::new();
    for r in &sorted {
        if !(with_rules && r.2) {
            if r.1 { tp += 1 } else { fp += 1 }
        }
        out.push((tp as f64 / attacks, tp as f64 / (tp + fp).max(1) as f64));
    }
    out
}

/// Read `pr.tsv` (from the evaluation) in `dir`, write `pr.png` there; returns the
/// precision and recall at the model's threshold (model alone, rules + model).
pub fn draw(dir: &Path) -> anyhow::Result<[(f64, f64); 2]> {
    let text = std::fs::read_to_string(dir.join("pr.tsv"))?;
    let mut threshold = 0.5f32;
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# threshold ") {
            threshold = t.trim().parse()?;
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        anyhow::ensure!(f.len() == 3, "pr.tsv: bad line {line:?}");
        rows.push((f[0].parse::<f32>()?, f[1] == "1", f[2] == "1"));
    }
    let mut c = Canvas::new();
    for i in 0..=10 {
        let v = f64::from(i) / 10.0;
        let grey = if i % 5 == 0 { [150, 150, 150] } else { [225, 225, 225] };
        c.line((v, 0.0), (v, 1.0), grey, 1);
        c.line((0.0, v), (1.0, v), grey, 1);
    }
    c.line((0.0, 0.0), (1.0, 0.0), [0, 0, 0], 2);
    c.line((0.0, 0.0), (0.0, 1.0), [0, 0, 0], 2);
    let mut at_threshold = [(0.0, 0.0); 2];
    for (k, (with_rules, colour)) in [(false, [30, 90, 200]), (true, [220, 60, 30])].into_iter().enumerate() {
        let points = curve(&rows, with_rules);
        for w in points.windows(2) {
            c.line(w[0], w[1], colour, 3);
        }
        let fired: Vec<_> = rows.iter().filter(|r| r.0 >= threshold || (with_rules && r.2)).collect();
        let tp = fired.iter().filter(|r| r.1).count() as f64;
        let attacks = rows.iter().filter(|r| r.1).count().max(1) as f64;
        let p = (tp / attacks, tp / (fired.len().max(1) as f64));
        c.dot(p, colour, 7);
        at_threshold[k] = p;
    }
    // The rules alone: one point.
    let fired: Vec<_> = rows.iter().filter(|r| r.2).collect();
    let tp = fired.iter().filter(|r| r.1).count() as f64;
    let attacks = rows.iter().filter(|r| r.1).count().max(1) as f64;
    c.dot((tp / attacks, tp / (fired.len().max(1) as f64)), [20, 150, 60], 7);
    std::fs::write(dir.join("pr.png"), c.png())?;
    Ok(at_threshold)
}
