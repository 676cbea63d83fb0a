"""Whole ``pipeline.run`` on precomputed vectors against exact search alone, one run.

    python bench/pipeline_vectors.py [--n 100000] [--dim 256] [--search auto|exact|annoy]
                                     [--queries 2000] [--workers 1]

Writes a catalogue-structured Parquet manifest (bench/catalog_vectors.py), runs
``python -m pipeline.run --input=… --embedding_column=embedding`` in a subprocess
(wall time including Beam start-up, index build and all writes), then times
``exact_top_k`` for a sample of query rows over all rows, extrapolated to N (cost
per query ∝ N), and prints the ratio with CPU steal of each phase.
``--workers W`` (W > 1) runs DirectRunner in multi-processing mode with W
worker processes, as ``python -m runners.direct`` does; 1 is one in-memory
process, ``pipeline.run``'s default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.catalog_vectors import catalog_vectors  # noqa: E402
from bench.cpu_steal import StealMeter  # noqa: E402
from pipeline import similarity_search as ss  # noqa: E402
from pipeline.publish import resolve_run  # noqa: E402
from pipeline.run_reader import read_manifest  # noqa: E402


def main(argv=None) -> int:
    """Generate, run the pipeline, time exact search alone, print the figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--search", default="auto")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1,
                        help="DirectRunner worker processes (>1: multi_processing mode)")
    args = parser.parse_args(argv)
    vecs, cats, types, models = catalog_vectors(args.n, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vectors.parquet")
        dim = args.dim
        flat = pa.array(vecs.reshape(-1))
        pq.write_table(pa.table({
            "product_id": [f"p{i:07d}" for i in range(args.n)],
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            "category": cats.astype(str), "product_type": types.astype(str),
            "model_group": models.astype(str)}), path)
        with StealMeter() as whole:
            subprocess.run([sys.executable, "-m", "pipeline.run", f"--input={path}",
                            f"--output={tmp}/out", "--embedding_column=embedding",
                            f"--search={args.search}", f"--top_k={args.top_k}"]
                           + ([f"--direct_num_workers={args.workers}",
                               "--direct_running_mode=multi_processing"]
                              if args.workers > 1 else []),
                           check=True, stdout=subprocess.DEVNULL)
        manifest = read_manifest(resolve_run(f"{tmp}/out")) or {}
        rng = np.random.default_rng(1)
        rows = np.sort(rng.choice(args.n, size=min(args.queries, args.n), replace=False))
        with StealMeter() as exact:
            ss.exact_top_k(vecs[rows], vecs, args.top_k, query_rows=rows)
        exact_all = exact.seconds * args.n / len(rows)
    print(f"N={args.n} D={args.dim} search={args.search} workers={args.workers}")
    print(f"pipeline.run whole wall: {whole.seconds:.1f} s{whole.label()}")
    summary = manifest.get("timings", {})
    print("  from the run's manifest: " + ", ".join(
        f"{key} {summary.get(key)}" for key in (
            "wall_seconds", "index_build_seconds", "annoy_build_seconds", "query_seconds_total")))
    print(f"exact search alone: {exact_all:.1f} s (extrapolated from {len(rows)} queries, "
          f"{exact.seconds:.2f} s{exact.label()})")
    print(f"ratio exact alone / whole run: {exact_all / whole.seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
