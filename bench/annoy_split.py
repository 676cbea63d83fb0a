"""The Annoy forest built as one forest on one thread against the split build, one run.

    python bench/annoy_split.py [--n 500000] [--dim 256] [--trees 0] [--queries 2000]

Both builds make the same number of trees over the same catalogue-structured vectors
(``bench/catalog_vectors.py``) with the same ``seed``: the single forest the way
``build_annoy_index`` built it before the split (``_build_here``, one thread), the
split one through ``build_annoy_index`` (``pipeline/annoy_forests.forest_plan``'s
sub-forests built at once, then merged). Prints each build's wall time with the CPU
steal over it, the ratio, and both forests' look-up recall@20 against exact search
for ``--queries`` sampled products at the default ``search_k`` (an item's own row
excluded), which is what a shop's query-by-image gets from the artefact.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.catalog_vectors import catalog_vectors  # noqa: E402
from bench.cpu_steal import StealMeter  # noqa: E402
from pipeline import annoy_forests  # noqa: E402
from pipeline import similarity_search as ss  # noqa: E402


def lookup_recall(path: str, vectors: np.ndarray, rows: np.ndarray, k: int, n_trees: int) -> float:
    """Share of each sampled row's exact top-``k`` (itself excluded) that the forest returns."""
    index = ss.open_annoy_index(path, vectors.shape[1])
    search_k = ss.default_search_k(n_trees, ss.default_candidates(k))
    exact_idx, _ = ss.exact_top_k(np.asarray(vectors[rows]), vectors, k, query_rows=rows)
    found = 0
    for row, truth in zip(rows.tolist(), exact_idx):
        got = [i for i in index.get_nns_by_item(row, k + 1, search_k=search_k) if i != row][:k]
        found += len(set(got) & set(truth.tolist()))
    index.unload()
    return found / (len(rows) * k)


def main(argv=None) -> int:
    """Build both ways, time them, score both forests' look-ups, print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--trees", type=int, default=0, help="0: default_n_trees")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    vectors = np.ascontiguousarray(catalog_vectors(args.n, args.dim)[0], dtype=np.float32)
    trees = args.trees or ss.default_n_trees(args.n, args.dim)
    plan = annoy_forests.forest_plan(args.n, trees, args.seed, parallel=True)
    rows = np.sort(np.random.default_rng(0).choice(args.n, args.queries, replace=False))
    print(f"N={args.n} D={args.dim} trees={trees} plan="
          + "+".join(f"{part.n_trees}@seed{part.seed}" for part in plan)
          + f" load1={os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        ss.save_vectors(os.path.join(tmp, "v.npy"), vectors)
        mapped = ss.load_vectors(os.path.join(tmp, "v.npy"))
        single = os.path.join(tmp, "single.ann")
        with StealMeter() as one:
            ss._build_here(mapped, single, trees, args.seed, on_disk=True)
        split = os.path.join(tmp, "split.ann")
        with StealMeter() as two:
            ss.build_annoy_index(mapped, split, trees, args.seed, on_disk=True, parallel=True)
        print(f"single forest, one thread: {one.seconds:8.1f} s{one.label()}")
        print(f"split build ({len(plan)} at once):  {two.seconds:8.1f} s{two.label()}")
        print(f"ratio single / split: {one.seconds / two.seconds:.2f}x")
        for name, path in (("single", single), ("split", split)):
            recall = lookup_recall(path, mapped, rows, 20, trees)
            print(f"look-up recall@20 ({name}, search_k default): {recall:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
