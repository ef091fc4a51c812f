"""The classifier's features, exactly as aegis-agent/src/rules/classifier.rs computes them.

Both sides must agree byte for byte: a change here is a change of the model format
(bump FORMAT in train.py and the Rust loader).
"""

import math

DIM_BITS = 18
DIM = 1 << DIM_BITS
WINDOW_CHARS = 4096
CHAR_MIN, CHAR_MAX = 3, 5
COUNT_CAP = 4.0
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


def vector(window: str):
    """Sparse feature vector {index: value}: bucket counts capped at COUNT_CAP, over the
    square root of their sum (so a text that repeats one n-gram cannot push its weight
    without bound)."""
    v = {}
    for idx, _ in features(window):
        v[idx] = min(v.get(idx, 0.0) + 1.0, COUNT_CAP)
    if not v:
        return {}
    scale = 1.0 / math.sqrt(sum(v.values()))
    return {i: c * scale for i, c in v.items()}
