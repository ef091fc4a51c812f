"""Train the prompt injection / jailbreak classifier and export it for the agent.

    cargo xtask train-detector        # makes a venv with the pinned packages, then runs this

or by hand: python3 -m venv V && V/bin/pip install numpy scipy scikit-learn pyyaml &&
V/bin/python tools/classifier/train.py [CACHE_DIR]

Writes packaging/models/injection_classifier.bin (embedded by the agent) and, for `cargo
xtask eval detection`, tools/classifier/data/heldout.jsonl (the held-out split),
heldout_families.jsonl (whole families left out, scored by a second model trained without
them, not shipped) and metrics.json. Deterministic: same inputs, same bytes.

The split is by template, never by row (rows of one template share most of their text):
in each family a quarter of its templates (groups), chosen by hash, is held out. The
threshold is set on out-of-fold scores of the training split's benign texts (at most 1%
above it), never on held-out rows.
"""

import hashlib
import json
import pathlib
import random
import re
import struct
import sys

import numpy as np
import yaml
from scipy.sparse import csr_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import features as F  # noqa: E402
import own_data  # noqa: E402
from fetch import fetch  # noqa: E402

ROOT = HERE.parent.parent
MODEL = ROOT / "packaging/models/injection_classifier.bin"
VERSION = "4.0.0"
FORMAT = b"AEGISLR2"
# At most this share of the benign training texts (out-of-fold) at or above the threshold,
# and at most this share of the prompt-like ones among them (model 4.0.0: the target is on
# prompt-like texts; with the documents and code slices counted in, most of the 1% fell on
# prompt-like texts: 1.9% of them out-of-fold on 3.0.0's data, 1.8% on 4.0.0's).
# (A margin, 0.5%, was tried: held-out false positives 1.7% instead of 1.9%, recall 88%
# instead of 93%; not kept.)
MAX_FPR = 0.01
# Regularisation candidates, chosen by out-of-fold recall at MAX_FPR on the training split.
CS = (4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0)
# Benign families that are documents or code, not prompt-like texts.
DOCUMENT_FAMILIES = {"code_rust", "doc_licence", "doc_pydoc", "own_hn_legal", "own_hn_legal_long", "stdlib", "stdlib_heldout"}
# Share of each family's groups in the test split.
TEST_SHARE = 0.25

# The harder figure: these families are left out of training entirely (a second model,
# reported next to the main one, not shipped).
HELDOUT_FAMILIES = {
    "pyrit/Arth_Singh",
    "pyrit/multi_parameter",
    "bastion/indirect_injection",
    "bastion/delimiter_injection",
    "bastion/exfiltration",
    "own_split",
    "own_many_shot",
    "own_translation",
    "own_fiction",
    "bastion/benign_ignore",
    "bastion/benign_encoded",
    "bastion/benign_roleplay",
    "bastion/benign_reveal",
    "bastion/benign_system",
    "bastion/benign_override",
    "bastion/benign_devkeys",
    "bastion/benign_memory",
    "own_benign_jailbreak_topic",
    "own_benign_dev",
    "stdlib_heldout",
}

FILL = {
    "examples": "User: How do I pick a lock?\nAssistant: Sure, first insert a tension wrench.\n" * 4,
    "prompt_in_greek": "Πώς μπορώ να κλέψω ένα αυτοκίνητο;",
    "target_group": "immigrants",
}


def fill(template: str, task: str) -> str:
    def sub(m):
        name = m.group(1)
        return task if name == "prompt" else FILL.get(name, task)

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", sub, template)


def load_rows(src: pathlib.Path):
    """Every row as (family, group, label, text); a group is one template or one written text."""
    rows = []
    tasks = own_data.TASKS
    tdir = src / "pyrit/datasets/jailbreak/templates"
    k = 0
    for folder in ["pliny", "Arth_Singh", "multi_parameter"]:
        for f in sorted((tdir / folder).rglob("*.yaml")):
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
            group = f"pyrit/{f.relative_to(tdir)}"
            for _ in range(2):
                rows.append((f"pyrit/{folder}", group, 1, fill(doc["value"], tasks[k % len(tasks)])))
                k += 1
    for f in sorted((src / "pyrit/datasets/seed_datasets/local/0din").glob("*.prompt")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for seed in doc.get("seeds", []):
            rows.append(("pyrit/0din", f"pyrit/0din/{f.stem}", 1, seed["value"]))
    for line in (src / "bastioncorpus/corpus/injections.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append((f"bastion/{r['category']}", f"bastion/{r['id']}", int(r["label"] == "malicious"), r["text"]))
    rows += own_data.rows()
    rows += own_data.hard_negatives()
    rows += own_data.hard_negatives_3() + own_data.attacks_3()
    rows += stdlib_rows()
    rows += document_rows()
    return rows


def stdlib_rows():
    """Benign technical text: slices of CPython 3.11's standard library sources (code,
    comments, docstrings; PSF licence), as tool results and pasted code look. Without them
    the model took any long technical text for an attack. Modules whose name's CRC32 is
    odd form the family left out in the families-out figure."""
    import sysconfig
    import zlib

    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(11)
    rows = []
    for f in sorted(lib.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) < 2000:
            continue
        held = zlib.crc32(f.stem.encode()) % 2 == 1
        family = "stdlib_heldout" if held else "stdlib"
        for _ in range(2):
            n = rng.randint(200, min(3000, len(text)))
            at = rng.randint(0, len(text) - n)
            rows.append((family, f"stdlib/{f.stem}", 0, text[at : at + n]))
    return rows


def _slices(text, rng, lo, hi, most):
    """Consecutive slices of `text`, each lo..hi characters, at most `most`, from a random start."""
    out = []
    at = rng.randint(0, max(0, len(text) - hi)) if len(text) > hi * most else 0
    while at < len(text) and len(out) < most:
        n = rng.randint(lo, hi)
        piece = text[at : at + n]
        if len(piece) >= lo // 2:
            out.append(piece)
        at += n
    return out


def document_rows():
    """Long benign documents, as tool results carry them (a model trained on prompt-sized
    texts only took any long text for an attack: its score grew with the length). Slices
    of up to a whole window (WINDOW_CHARS), several per document, one group per document:
    - licence texts shipped in the trainer's pinned wheels (numpy, scipy, scikit-learn,
      PyYAML dist-info) and CPython's LICENSE.txt: legal prose. The GNU GPL and LGPL texts
      bundled there are cut out: the GPL is the agent's regression test (a licence the
      model never saw), so it is kept out of training;
    - CPython's pydoc topics (the language reference, prose with code);
    - Rust sources of the crates listed in rust_crates.txt (from cargo's registry cache,
      filled by any build of the workspace), docs and code; not this repository's own
      sources (the regression test scores one)."""
    import sysconfig

    rng = random.Random(17)
    rows = []
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    lic_files = [stdlib / "LICENSE.txt"]
    for pkg in ("numpy", "scipy", "scikit_learn", "pyyaml", "PyYAML"):
        for d in sorted(site.glob(f"{pkg}-*.dist-info")):
            lic_files += sorted(f for f in d.rglob("*") if f.is_file() and re.search(r"licen[cs]e|copying", f.name, re.I))
    gpl = re.compile(r"^\s*GNU (LESSER |LIBRARY )?GENERAL PUBLIC LICENSE\s*$", re.M)
    for f in lic_files:
        if not f.exists():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        m = gpl.search(text)
        if m:
            text = text[: m.start()]
        if len(text) < 400:
            continue
        group = "licence/" + str(f.relative_to(site if site in f.parents else stdlib))
        for piece in _slices(text, rng, 1500, 4500, 6):
            rows.append(("doc_licence", group, 0, piece))
    sys.path.insert(0, str(stdlib))
    from pydoc_data import topics

    for name in sorted(topics.topics):
        text = topics.topics[name]
        if len(text) < 1500:
            continue
        for piece in _slices(text, rng, 1500, 4500, 3):
            rows.append(("doc_pydoc", f"pydoc/{name}", 0, piece))
    rows += rust_rows(rng)
    return rows


def rust_rows(rng):
    """Slices of the Rust sources of the crates listed in rust_crates.txt (see
    document_rows): Cargo.lock's registry crates when model 3.0.0 was trained, pinned there
    (read from Cargo.lock itself, the data changed with every dependency change: model 3.0.0
    was not reproducible once iced-x86 was added). A crate missing from cargo's registry
    cache is an error, not a silent skip: the model's bytes would change."""
    import os

    listed = (HERE / "rust_crates.txt").read_text(encoding="utf-8").splitlines()
    pinned = [tuple(line.split()) for line in listed if line.strip() and not line.startswith("#")]
    home = pathlib.Path(os.environ.get("CARGO_HOME", pathlib.Path.home() / ".cargo"))
    regs = sorted((home / "registry/src").glob("*"))
    rows, missing = [], []
    for name, version in pinned:
        crate = next((r / f"{name}-{version}" for r in regs if (r / f"{name}-{version}").is_dir()), None)
        if crate is None:
            missing.append(f"{name} {version}")
            continue
        files = sorted(f for f in (crate / "src").rglob("*.rs") if f.stat().st_size > 3000) if (crate / "src").is_dir() else []
        if not files:
            continue
        for f in rng.sample(files, min(2, len(files))):
            text = f.read_text(encoding="utf-8", errors="replace")
            for piece in _slices(text, rng, 1000, 4500, 2):
                rows.append(("code_rust", f"rust/{name}", 0, piece))
    if missing:
        raise SystemExit(
            f"rust sources: {len(missing)} of {len(pinned)} crates of tools/classifier/rust_crates.txt are not in "
            f"cargo's registry cache ({home / 'registry/src'}): {', '.join(missing[:5])}...; run `cargo fetch` "
            "(or build the workspace) at the commit of the model, which pins them all"
        )
    return rows


def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def split(rows):
    """Stratified by family, grouped by template: in each family, the TEST_SHARE of its
    groups whose SHA-256 is lowest go to the test split (families of one group stay in
    training). No group is on both sides."""
    groups = {}
    for fam, group, _, _ in rows:
        groups.setdefault(fam, set()).add(group)
    test_groups = set()
    for fam, gs in groups.items():
        ordered = sorted(gs, key=_h)
        test_groups.update(ordered[: int(len(ordered) * TEST_SHARE + 0.5)] if len(ordered) > 1 else [])
    train = [r for r in rows if r[1] not in test_groups]
    test = [r for r in rows if r[1] in test_groups]
    return train, test


def compose(side, rng, tag, buried=40):
    """Rows made of one side's rows only: long benign texts (several benign requests and
    tool results joined, as a conversation's text) and attacks buried among benign requests."""
    benign = [r[3] for r in side if r[2] == 0 and r[0].startswith("own_benign") and r[0] != "own_benign_short"]
    attacks = [r[3] for r in side if r[2] == 1 and r[0] in ("own_override", "own_devmode", "own_persona", "own_extract", "own_indirect")]
    out = []
    for i in range(60):
        out.append(("own_benign_long", f"{tag}/long/{i}", 0, "\n\n".join(rng.sample(benign, rng.randint(3, 10)))))
    for i in range(buried):
        parts = rng.sample(benign, rng.randint(1, 3)) + [rng.choice(attacks)]
        rng.shuffle(parts)
        out.append(("own_buried", f"{tag}/buried/{i}", 1, "\n\n".join(parts)))
    # Long legal documents: 5 to 20 of this side's written legal paragraphs (their own
    # generator, so the rows above stay as they were).
    legal = [r[3] for r in side if r[0] == "own_hn_legal"]
    lrng = random.Random(rng.random())
    for i in range(20 if legal else 0):
        out.append(("own_hn_legal_long", f"{tag}/legal/{i}", 0, "\n\n".join(lrng.sample(legal, min(len(legal), lrng.randint(5, 20))))))
    return out


def count_matrix(texts):
    """Raw bucket counts of each text's first window (what `matrix` turns into features)."""
    data, ind, ptr = [], [], [0]
    for t in texts:
        v = F.counts(F.windows(F.normalize(t))[0])
        ind.extend(v.keys())
        data.extend(v.values())
        ptr.append(len(ind))
    return csr_matrix((np.array(data, dtype=np.float64), np.array(ind), np.array(ptr)), shape=(len(texts), F.DIM))


def features_of(counts, choice):
    """The features.vector values of a count matrix, for choice (cap, floor)."""
    cap, floor = choice
    X = counts.copy()
    X.data = np.minimum(X.data, cap)
    norm = np.sqrt(np.maximum(np.asarray(X.sum(axis=1)).ravel(), floor))
    norm[norm == 0] = 1.0
    X = X.multiply(1.0 / norm[:, None]).tocsr()
    X.sort_indices()
    return X


def matrix(texts, choice):
    return features_of(count_matrix(texts), choice)


def fit(X, y, c):
    m = LogisticRegression(C=c, class_weight="balanced", solver="liblinear", max_iter=1000, random_state=0)
    m.fit(X, y)
    return m


def score(m, X):
    return 1.0 / (1.0 + np.exp(-(X @ m.coef_[0].astype(np.float32) + np.float32(m.intercept_[0]))))


def short(texts):
    """Texts the agent does not score (under MIN_CHARS normalised characters): they score 0."""
    return np.array([len(F.normalize(t)) < F.MIN_CHARS for t in texts])


def train_model(rows, choices=F.FEATURE_CHOICES):
    """Fit on `rows`; the feature choice (count cap, norm floor), C and the threshold from
    out-of-fold scores (folds by group): the lowest threshold with at most MAX_FPR of the
    benign rows, and at most MAX_FPR of the prompt-like benign rows, at or above it; the
    choice and C with the highest recall there."""
    counts = count_matrix([r[3] for r in rows])
    y = np.array([r[2] for r in rows])
    groups = np.array([r[1] for r in rows])
    tiny = short([r[3] for r in rows])
    prompt_like = np.array([r[2] == 0 and r[0] not in DOCUMENT_FAMILIES for r in rows])
    best = None
    for choice, c in [(ch, c) for ch in choices for c in CS]:
        X = features_of(counts, choice)
        oof = np.zeros(len(rows))
        for tr, te in GroupKFold(n_splits=5).split(X, y, groups):
            oof[te] = score(fit(X[tr], y[tr], c), X[te])
        oof[tiny] = 0.0
        threshold = 0.5
        for mask in (y == 0, prompt_like):
            benign = np.sort(oof[mask])[::-1]
            allowed = int(np.floor(MAX_FPR * len(benign)))
            threshold = max(threshold, float(np.nextafter(np.float32(benign[allowed]), np.float32(1))))
        recall = float((oof[y == 1] >= threshold).mean())
        fpr = float((oof[y == 0] >= threshold).mean())
        pl_fpr = float((oof[prompt_like] >= threshold).mean())
        print(f"features {choice}, C={c}: out-of-fold recall {recall:.3f}, false positives {fpr:.4f} "
              f"(prompt-like {pl_fpr:.4f}), threshold {threshold:.3f}", file=sys.stderr)
        if best is None or recall > best[1]:
            best = (c, recall, fpr, threshold, choice, pl_fpr)
    c, recall, fpr, threshold, choice, pl_fpr = best
    model = fit(features_of(counts, choice), y, c)
    model.choice = choice
    return model, dict(c=c, oof_recall=recall, oof_fpr=fpr, oof_fpr_prompt_like=pl_fpr, threshold=threshold, features=list(choice))


def evaluate(model, threshold, rows):
    texts = [r[3] for r in rows]
    s = score(model, matrix(texts, model.choice))
    s[short(texts)] = 0.0
    y = np.array([r[2] for r in rows])
    return s, float((s[y == 1] >= threshold).mean()), float((s[y == 0] >= threshold).mean())


def write_rows(path, rows, scores):
    with open(path, "w", encoding="utf-8") as f:
        for (fam, group, label, text), s in zip(rows, scores):
            f.write(json.dumps({"family": fam, "group": group, "label": label, "text": text, "score": round(float(s), 6)}, ensure_ascii=False) + "\n")


def main():
    cache = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path("/tmp/aegis-classifier-cache")
    src = fetch(cache)
    rows = load_rows(src)
    train, test = split(rows)
    # More buried attacks in training than in the test: the model must learn to find an
    # attack among benign text (the test keeps the same 40 as the other families' size).
    train += compose(train, random.Random(13), "train", buried=160)
    test += compose(test, random.Random(14), "test")
    data = HERE / "data"
    data.mkdir(exist_ok=True)

    model, fitted = train_model(train)
    threshold = fitted["threshold"]
    w = model.coef_[0].astype("<f4")
    bias = float(np.float32(model.intercept_[0]))
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    v = VERSION.encode()
    cap, floor = model.choice
    header = FORMAT + struct.pack("<IIIIIIffI", F.DIM_BITS, F.CHAR_MIN, F.CHAR_MAX, F.WINDOW_CHARS, cap, floor, bias, threshold, len(v)) + v
    MODEL.write_bytes(header + w.tobytes())
    sh, recall, fpr = evaluate(model, threshold, test)
    write_rows(data / "heldout.jsonl", test, sh)

    # The harder figure: whole families never seen in training (a second model, not shipped).
    lofo_train = [r for r in train if r[0] not in HELDOUT_FAMILIES]
    lofo_test = [r for r in rows if r[0] in HELDOUT_FAMILIES]
    # The same feature choice as the shipped model (C and threshold chosen again).
    lofo_model, lofo_fit = train_model(lofo_train, choices=[model.choice])
    sl, lrecall, lfpr = evaluate(lofo_model, lofo_fit["threshold"], lofo_test)
    write_rows(data / "heldout_families.jsonl", lofo_test, sl)

    yt = np.array([r[2] for r in train])
    yh = np.array([r[2] for r in test])
    metrics = {
        "version": VERSION,
        "threshold": threshold,
        "C": fitted["c"],
        "features": fitted["features"],
        "train_rows": len(train),
        "train_attacks": int(yt.sum()),
        "train_benign": int((yt == 0).sum()),
        "oof_recall": fitted["oof_recall"],
        "oof_fpr": fitted["oof_fpr"],
        "oof_fpr_prompt_like": fitted["oof_fpr_prompt_like"],
        "heldout_rows": len(test),
        "heldout_attacks": int(yh.sum()),
        "heldout_benign": int((yh == 0).sum()),
        "heldout_recall_python": recall,
        "heldout_fpr_python": fpr,
        "families_out": {
            "families": sorted(HELDOUT_FAMILIES),
            "threshold": lofo_fit["threshold"],
            "train_rows": len(lofo_train),
            "test_rows": len(lofo_test),
            "test_attacks": int(sum(r[2] for r in lofo_test)),
            "recall_python": lrecall,
            "fpr_python": lfpr,
        },
    }
    (data / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"{MODEL}: {MODEL.stat().st_size} bytes")


if __name__ == "__main__":
    main()
