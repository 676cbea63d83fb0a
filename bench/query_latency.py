"""Latency of looking up new images against published runs of 5k and 100k products.

For each catalogue size a published run is written straight into the run layout
(``manifest.json``, ``index/{vectors.npy, ids.parquet, meta.json, annoy.ann}``)
from synthetic clustered unit vectors, with the default model's id, engine and
input size, and the search method ``--search=auto`` would pick (exact at 5k,
Annoy + exact re-rank at 100k, with the pipeline's default trees and search_k).
Embedding 100k real images would take ~10 min on 2 cores and measure the embed
stage, not the look-up. Then:

* cold start, in a fresh interpreter: imports, ``SimilarityIndex.open`` (index
  memory-mapped, model loaded from the cache without TensorFlow, the decoder
  imported), then the first and second queries;
* warm per-image latency, p50 / p95 over ``--queries`` real product photos
  (``../shared/data/products`` when present, else generated pictures): single
  images (``query_image``) and batches (``query_images``, per image), next to
  the model alone on the same pre-decoded pixels and the search alone;
* recall@20 of the run's search against exact cosine over its vectors.

Run: ``python bench/query_latency.py [--sizes 5000,100000] [--queries 200]
[--work DIR]`` (runs are kept in ``--work`` and reused). Needs the default
model's verified TFLite conversion in the model cache (any pipeline run with
the default model makes it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_steal import StealMeter  # noqa: E402

# ../shared beside the main checkout; a worktree under /work/wt/ finds it two levels up.
DEFAULT_PRODUCTS = next((p for p in (REPO.parent / "shared" / "data" / "products",
                                     REPO.parents[1] / "shared" / "data" / "products")
                         if p.is_dir()), REPO.parent / "shared" / "data" / "products")
DIM = 1280


def synthetic_vectors(n: int, dim: int, seed: int = 0):
    """Clustered unit vectors (1,000 clusters), like neighbors_scale.py's data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(1000, dim)).astype(np.float32)
    vectors = centers[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, dim)).astype(
        np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def write_run(root: Path, n: int, model) -> Path:
    """A published run of ``n`` synthetic products for ``model`` (ResolvedModel)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import similarity_search

    run_dir = root / f"n{n}" / "runs" / "synthetic"
    if (run_dir / "manifest.json").exists():
        return root / f"n{n}" / "LATEST"
    index = run_dir / "index"
    index.mkdir(parents=True, exist_ok=True)
    vectors = synthetic_vectors(n, model.dim)
    similarity_search.save_vectors(index / "vectors.npy", vectors)
    ids = [f"s{i:07d}" for i in range(n)]
    pq.write_table(pa.table({"row": pa.array(range(n), pa.int64()),
                             "product_id": pa.array(ids, pa.string())}),
                   index / "ids.parquet")
    search = similarity_search.choose_search(n, "auto", similarity_search.exact_max_n_for(
        model.dim))
    n_trees = similarity_search.default_n_trees(n, model.dim)
    candidates = similarity_search.default_candidates(20)
    search_k = similarity_search.default_search_k(n_trees, candidates)
    started = time.perf_counter()
    if search == "annoy":
        similarity_search.build_annoy_index(vectors, index / "annoy.ann", n_trees, 42)
    meta = {"model": model.model_id, "partition": None, "dim": model.dim, "metric": "angular",
            "n_trees": n_trees, "seed": 42, "count": n, "search": search,
            "search_k": search_k, "candidates": candidates, "top_k": 20, "query_k": 20,
            "files": {"annoy": "annoy.ann" if search == "annoy" else None,
                      "vectors": "vectors.npy", "ids": "ids.parquet"},
            "build_seconds": round(time.perf_counter() - started, 1)}
    (index / "meta.json").write_text(json.dumps(meta))
    (run_dir / "neighbors").mkdir(exist_ok=True)
    manifest = {"model": model.model_id, "model_name": model.name, "engine": model.engine,
                "input_size": model.input_size, "dim": model.dim, "top_k": 20,
                "pca_dim": None, "counts": {"input": n, "embedded": n, "failed": 0},
                "index": {"count": n, "search": search, "dim": model.dim},
                "note": "synthetic vectors written by bench/query_latency.py"}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    latest = root / f"n{n}" / "LATEST"
    if not latest.exists():
        os.symlink("runs/synthetic", latest)
    return latest


_COLD = r"""
import json, sys, time
t0 = time.perf_counter()
from pipeline.similarity_index import SimilarityIndex
t1 = time.perf_counter()
index = SimilarityIndex.open(sys.argv[1])
t2 = time.perf_counter()
index.query_image(sys.argv[2], k=20)
t3 = time.perf_counter()
index.query_image(sys.argv[2], k=20)
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "open": t2 - t1, "cold_start": t2 - t0,
                  "first_query": t3 - t2, "second_query": t4 - t3,
                  "tensorflow_imported": "tensorflow" in sys.modules,
                  "beam_imported": "apache_beam" in sys.modules}))
"""


def cold_start(latest: Path, image: str, repeats: int = 3) -> dict:
    """Median of ``repeats`` fresh interpreters (the page cache is warm after the first)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _COLD, str(latest), image], cwd=REPO,
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["cold_start"])
    return runs[len(runs) // 2]


def percentiles(samples):
    """(p50, p95) in milliseconds."""
    import numpy as np

    values = np.asarray(samples) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def sample_images(count: int, work: Path) -> list[str]:
    """Real product photos when the shared data set is here, else generated ones."""
    found = sorted(glob.glob(str(DEFAULT_PRODUCTS / "images" / "*.jpg")))
    if found:
        step = max(1, len(found) // count)
        return found[::step][:count]
    from tests.conftest import FAMILIES, shape_image

    directory = work / "images"
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        kind, color = FAMILIES[i % len(FAMILIES)]
        path = directory / f"g{i}.jpg"
        if not path.exists():
            shape_image(kind, color, size=400).rotate(i % 17).save(path, quality=88)
        paths.append(str(path))
    return paths


def warm(latest: Path, images: list[str], batch: int) -> dict:
    """Warm per-image latencies: single, batched, model alone, search alone; recall@20."""
    import numpy as np

    from pipeline import similarity_search
    from pipeline.image_decode import decode_image
    from pipeline.similarity_index import SimilarityIndex

    index = SimilarityIndex.open(str(latest))
    for path in images[:5]:
        index.query_image(path)
    single = []
    with StealMeter() as single_meter:
        for path in images:
            t = time.perf_counter()
            index.query_image(path, k=20)
            single.append(time.perf_counter() - t)
    batched = []
    with StealMeter() as batch_meter:
        for b in range(0, len(images) - batch + 1, batch):
            t = time.perf_counter()
            index.query_images(images[b:b + batch], k=20)
            batched.append((time.perf_counter() - t) / batch)
    size = index.info.input_size
    pixels = [decode_image(open(p, "rb").read(), size).pixels for p in images]
    engine = index._engine
    model_only, decode_only = [], []
    for path, pix in zip(images, pixels):
        data = open(path, "rb").read()
        t = time.perf_counter()
        decode_image(data, size)
        decode_only.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.embed_pixels([pix])
        model_only.append(time.perf_counter() - t)
    vectors = index.embed(images[: min(len(images), 64)])
    search_only = []
    for v in vectors:
        t = time.perf_counter()
        index.query_vector(v, k=20)
        search_only.append(time.perf_counter() - t)
    # Recall@20 of the run's search against exact cosine, on queries near the
    # catalogue's own clusters (noisy copies of stored vectors) — the hard case.
    stored = index._partitions[0].vectors
    rng = np.random.default_rng(5)
    rows = rng.choice(len(stored), 200, replace=False)
    queries = np.asarray(stored[rows]) + 0.3 * rng.normal(size=(200, stored.shape[1])).astype(
        np.float32) / np.sqrt(stored.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_idx, _ = similarity_search.exact_top_k(queries, stored, 20)
    hits = 0
    ids = index._partitions[0].product_ids
    for q, want in zip(queries, exact_idx):
        got = {n["product_id"] for n in index.query_vector(q, k=20)}
        hits += len(got & {ids[j] for j in want})
    return {"single": percentiles(single), "single_steal": single_meter.label(),
            "batch": percentiles(batched), "batch_steal": batch_meter.label(),
            "model": percentiles(model_only), "decode": percentiles(decode_only),
            "search": percentiles(search_only), "recall20": hits / (20 * len(queries)),
            "search_method": index.info.search, "lanes": engine.lanes}


def main(argv=None) -> int:
    """Build (or reuse) the runs, measure, print a table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(),
                                                       "query-latency-bench"))
    args = parser.parse_args(argv)
    from pipeline.models.registry import resolve_model

    model = resolve_model("efficientnet_lite0")
    if model.engine != "tflite":
        print("the default model has no verified TFLite conversion here; run the pipeline "
              "once with the default model first", file=sys.stderr)
        return 2
    work = Path(args.work)
    images = sample_images(args.queries, work)
    print(f"model {model.model_id} ({model.engine}), {len(images)} query images "
          f"({'shared products' if 'shared' in images[0] else 'generated'}), "
          f"{os.cpu_count()} cores")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with StealMeter() as build:
            latest = write_run(work, n, model)
        print(f"N={n}: run at {latest} ({build.seconds:.1f} s to write{build.label()})")
        cold = cold_start(latest, images[0])
        result = warm(latest, images, args.batch)
        rows.append((n, cold, result))
        print(f"  cold start {cold['cold_start']:.2f} s (imports {cold['imports']:.2f}, open + "
              f"model + decoder {cold['open']:.2f}; TensorFlow imported: "
              f"{cold['tensorflow_imported']}, Beam imported: "
              f"{cold['beam_imported']}); first query {1000 * cold['first_query']:.0f} ms, "
              f"second {1000 * cold['second_query']:.1f} ms")
        print(f"  warm single image p50 {result['single'][0]:.1f} ms, p95 "
              f"{result['single'][1]:.1f} ms{result['single_steal']}")
        print(f"  warm batch of {args.batch}, per image p50 {result['batch'][0]:.1f} ms, p95 "
              f"{result['batch'][1]:.1f} ms{result['batch_steal']}")
        print(f"  parts: decode p50 {result['decode'][0]:.1f} ms, model alone p50 "
              f"{result['model'][0]:.1f} ms ({result['lanes']} lanes), search alone "
              f"({result['search_method']}) p50 {result['search'][0]:.1f} ms, p95 "
              f"{result['search'][1]:.1f} ms; recall@20 vs exact {result['recall20']:.4f}")
    print("\n| products | search | cold start (s) | first query (ms) | single p50 / p95 (ms) | "
          f"batch of {args.batch} p50 / p95 per image (ms) | model alone p50 (ms) | "
          "search alone p50 (ms) | recall@20 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, cold, r in rows:
        print(f"| {n:,} | {r['search_method']} | {cold['cold_start']:.2f} | "
              f"{1000 * cold['first_query']:.0f} | {r['single'][0]:.1f} / {r['single'][1]:.1f} | "
              f"{r['batch'][0]:.1f} / {r['batch'][1]:.1f} | {r['model'][0]:.1f} | "
              f"{r['search'][0]:.1f} | {r['recall20']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
