"""The detect-secrets baseline of `cargo xtask bench rules`.

Scans the files of a corpus directory (one API body per file, as written by rules_bench)
with detect-secrets' library API and default settings, i.e. what `detect-secrets scan
FILE` does: every default plugin, every default filter. Single process, one file after
the other in name order (the generator interleaves body kinds, so any prefix is a fair
sample), until SECONDS have passed or every file was scanned once: detect-secrets is too
slow to go over a whole corpus within a benchmark's time.

Usage: python3 detect_secrets_bench.py CORPUS_DIR SECONDS
Prints one JSON line:
  {"mbps":..., "bytes":..., "files":..., "files_total":..., "seconds":...,
   "secrets":K, "files_with_secrets":F, "types":{...}, "version":"..."}
"""

import json
import os
import sys
import time
from collections import Counter

from detect_secrets import SecretsCollection
from detect_secrets.__version__ import VERSION
from detect_secrets.settings import default_settings


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} CORPUS_DIR SECONDS")
    corpus, seconds = sys.argv[1], float(sys.argv[2])
    paths = sorted(
        os.path.join(corpus, name)
        for name in os.listdir(corpus)
        if os.path.isfile(os.path.join(corpus, name))
    )

    with default_settings():
        # Warm-up outside the timing: plugin and filter set-up happens on first use.
        SecretsCollection().scan_file(paths[0])

        secrets = SecretsCollection()
        scanned = 0
        nbytes = 0
        start = time.thread_time()
        for path in paths:
            secrets.scan_file(path)
            nbytes += os.path.getsize(path)
            scanned += 1
            if time.thread_time() - start >= seconds:
                break
        elapsed = time.thread_time() - start

    types = Counter(s.type for _, s in secrets)
    print(json.dumps({
        "mbps": nbytes / elapsed / 1e6,
        "bytes": nbytes,
        "files": scanned,
        "files_total": len(paths),
        "seconds": elapsed,
        "secrets": sum(types.values()),
        "files_with_secrets": len(secrets.files),
        "types": dict(types),
        "version": VERSION,
    }))


if __name__ == "__main__":
    main()
