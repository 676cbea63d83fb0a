"""Compare two runs' outputs: are they the same, file for file?

    python bench/compare_runs.py RUN_DIR_A RUN_DIR_B

For checking that a refactoring changed no behaviour: run the same catalogue with
the same ``--run_id`` from both trees, then compare. Every file of the two run
directories is compared byte for byte, except:

* Parquet files (``features/``, ``index/ids.parquet``): compared as tables (schema,
  schema metadata and values) after sorting by ``product_id``: the order of rows in a
  feature shard is the order Beam happened to process them in, which no reader uses;
* JSON files (``manifest.json``, ``index/meta.json``): compared as JSON with their
  wall-clock fields left out (timings, start/finish times, build seconds), which
  differ between any two runs. Run both with the same ``--output`` and ``--run_id``,
  since the manifest records both.

Prints one line per file and exits 1 when anything differs.
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow.parquet as pq

# JSON keys that hold wall-clock facts of one particular run.
VOLATILE_KEYS = {"timings", "started_at", "finished_at", "host", "elapsed_seconds", "phases",
                 "build_seconds", "annoy_build_seconds"}


def _files(root: str) -> set[str]:
    found = set()
    for directory, _, names in os.walk(root):
        for name in names:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _same(a: str, b: str, rel: str) -> tuple[bool, str]:
    if rel.endswith(".parquet"):
        ta, tb = pq.read_table(a), pq.read_table(b)
        if "product_id" in ta.column_names and "product_id" in tb.column_names:
            ta, tb = ta.sort_by("product_id"), tb.sort_by("product_id")
        return ta.equals(tb, check_metadata=True), f"{ta.num_rows} rows, sorted by id"
    if rel.endswith(".json"):
        with open(a, encoding="utf-8") as fa, open(b, encoding="utf-8") as fb:
            ma, mb = _strip(json.load(fa)), _strip(json.load(fb))
        return ma == mb, "without " + ", ".join(sorted(VOLATILE_KEYS))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        da, db = fa.read(), fb.read()
    return da == db, f"{len(da):,} bytes"


def main(argv: list[str]) -> int:
    """Print one line per file of either run; return 1 when any differs or is missing."""
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    left, right = argv
    names_a, names_b = _files(left), _files(right)
    failures = 0
    for rel in sorted(names_a | names_b):
        if rel not in names_a or rel not in names_b:
            print(f"MISSING  {rel} (only in {'A' if rel in names_a else 'B'})")
            failures += 1
            continue
        same, detail = _same(os.path.join(left, rel), os.path.join(right, rel), rel)
        print(f"{'same   ' if same else 'DIFFERS'}  {rel}  ({detail})")
        failures += not same
    print(f"{len(names_a | names_b)} files, {failures} differing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
