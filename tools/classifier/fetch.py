"""Fetch the public corpora the classifier is trained on, pinned by version and SHA-256.

Only these parts are read (see LICENSES.md; the rest overlaps a private evaluation set
and must not be used):
- pyrit 1.1.0 (MIT): datasets/jailbreak/templates/{pliny,Arth_Singh,multi_parameter}/ and
  datasets/seed_datasets/local/0din/ — NOT in_the_wild/, NOT the top-level templates,
  NOT seed_datasets/local/garak.
- bastioncorpus 0.6.0 (MIT): corpus/injections.jsonl (118 attacks, 63 benign).
"""

import hashlib
import pathlib
import subprocess
import sys
import zipfile

WHEELS = {
    "pyrit==1.1.0": ("pyrit-1.1.0-py3-none-any.whl", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"),
    "bastioncorpus==0.6.0": (
        "bastioncorpus-0.6.0-py3-none-any.whl",
        "96d7268cfafc2be0908382b61af8b67dec19058e2877657b217e68be0552a00a",
    ),
}
ALLOWED = (
    "pyrit/datasets/jailbreak/templates/pliny/",
    "pyrit/datasets/jailbreak/templates/Arth_Singh/",
    "pyrit/datasets/jailbreak/templates/multi_parameter/",
    "pyrit/datasets/seed_datasets/local/0din/",
    "bastioncorpus/corpus/injections.jsonl",
)


def fetch(cache: pathlib.Path) -> pathlib.Path:
    """Download (once) and extract the allowed parts into cache/src; return that directory."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "src"
    for spec, (name, sha) in WHEELS.items():
        whl = cache / name
        if not whl.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), spec], check=True)
        got = hashlib.sha256(whl.read_bytes()).hexdigest()
        if got != sha:
            raise SystemExit(f"{name}: sha256 {got}, expected {sha}: delete it and fetch again, or update the pin")
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if member.startswith(ALLOWED):
                    z.extract(member, out)
    return out
