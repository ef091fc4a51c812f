"""The classifier's features, exactly as aegis-agent/src/rules/classifier.rs computes them.

Both sides must agree byte for byte: a change here is a change of the model format
(bump FORMAT in train.py and the Rust loader).
"""

import math

DIM_BITS = 18
DIM = 1 << DIM_BITS
WINDOW_CHARS = 4096
CHAR_MIN, CHAR_MAX = 3, 5
# Feature value choices the trainer picks from by cross-validation on the training split
# (written into the model file): (count cap, norm floor). (4, 0) is the first model's:
# counts capped at 4, over the square root of their sum. (1, 256): presence only, over the
# square root of max(number of distinct buckets, 256), so a text with few distinct n-grams
# (a word repeated, a short line) does not have them weighted up to a whole prompt's norm,
# and a repeated n-gram counts once. 256 is about the n-grams of an 80-character prompt,
# chosen before training, not tuned.
FEATURE_CHOICES = ((4, 0), (1, 256))
# Texts with fewer normalised characters score 0 (aegis-agent: MIN_CHARS).
MIN_CHARS = 20
FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


def normalize(text: str) -> str:
    """Lower case, every run of white space one space, trimmed."""
    return " ".join(text.lower().split())


def windows(norm: str):
    """The normalised text in windows of WINDOW_CHARS characters (at least one)."""
    if not norm:
        return [""]
    return [norm[i : i + WINDOW_CHARS] for i in range(0, len(norm), WINDOW_CHARS)]


def _fnv(h: int, data: bytes) -> int:
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
    return h


def is_word_char(c: str) -> bool:
    return c.isalnum()


def words(window: str):
    out, cur = [], []
    for c in window:
        if is_word_char(c):
            cur.append(c)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def features(window: str):
    """(hash index, n-gram text) of every feature occurrence of one window."""
    out = []
    padded = " " + window + " "
    enc = [c.encode("utf-8") for c in padded]
    base_c = _fnv(FNV_OFFSET, b"c")
    for i in range(len(enc)):
        h = base_c
        for n in range(1, CHAR_MAX + 1):
            if i + n > len(enc):
                break
            h = _fnv(h, enc[i + n - 1])
            if n >= CHAR_MIN:
                out.append((h & (DIM - 1), padded[i : i + n]))
    ws = words(window)
    base_w = _fnv(FNV_OFFSET, b"w")
    base_b = _fnv(FNV_OFFSET, b"b")
    for i, w in enumerate(ws):
        wb = w.encode("utf-8")
        out.append((_fnv(base_w, wb) & (DIM - 1), w))
        if i + 1 < len(ws):
            out.append((_fnv(_fnv(_fnv(base_b, wb), b" "), ws[i + 1].encode("utf-8")) & (DIM - 1), w + " " + ws[i + 1]))
    return out


def counts(window: str):
    """{index: count} of the window's feature occurrences."""
    v = {}
    for idx, _ in features(window):
        v[idx] = v.get(idx, 0) + 1
    return v


def vector(window: str, cap: int, floor: int):
    """Sparse feature vector {index: value}: bucket counts capped at `cap`, over the square
    root of max(their sum, floor) (so a text that repeats one n-gram cannot push its weight
    without bound, nor one with few distinct n-grams weight each of them up)."""
    v = {i: float(min(c, cap)) for i, c in counts(window).items()}
    if not v:
        return {}
    scale = 1.0 / math.sqrt(max(sum(v.values()), floor))
    return {i: c * scale for i, c in v.items()}
