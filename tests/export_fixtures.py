"""Small, complete run directories written directly in the output contract, for loader tests.

Building them with pyarrow and json (not by running the pipeline) keeps the
export tests fast, and lets a test shape the run: how many products, which
ids (including ones with tabs, quotes, backslashes and non-ASCII characters,
which COPY and JSON must carry unchanged), and a manifest that is missing or
disagrees with the files.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalog import CatalogInfo
from pipeline.features import features_schema
from pipeline.models.registry import ResolvedModel

MODEL = "test/tiny-features@1"
AWKWARD_IDS = ["sku\twith\ttabs", 'quote"d', "back\\slash", "ümlaut-é-日本", "comma,semi;"]


@dataclass
class FakeRun:
    """A run directory on disk and what it contains."""

    path: str
    ids: list[str]
    vectors: np.ndarray  # float32 [N, D], row i belongs to ids[i]
    neighbors: dict[str, list[tuple[str, float]]]
    model: str
    top_k: int

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def pairs(self) -> int:
        return sum(len(v) for v in self.neighbors.values())

    def vector(self, product_id: str) -> np.ndarray:
        return self.vectors[self.ids.index(product_id)]


def _top_k(ids: list[str], vectors: np.ndarray, k: int) -> dict[str, list[tuple[str, float]]]:
    sims = vectors @ vectors.T
    out = {}
    for i, pid in enumerate(ids):
        ranked = sorted(((round(float(sims[i, j]), 4), ids[j]) for j in range(len(ids)) if j != i),
                        key=lambda t: (-t[0], t[1]))[:k]
        out[pid] = [(other, sim) for sim, other in ranked]
    return out


def write_run(path: str, count: int = 30, dim: int = 8, top_k: int = 5, seed: int = 0,
              prefix: str = "p", awkward_ids: bool = True, shards: int = 2,
              complete: bool = True, manifest_products: int | None = None,
              features_only: bool = False) -> FakeRun:
    """Write features, neighbours, flat pairs, index meta and (unless not ``complete``) a manifest.

    ``manifest_products`` makes the manifest promise a different number of
    neighbour lists than the files hold, as a corrupted or mixed-up run would;
    ``features_only`` writes a ``--features_only`` run (no neighbours, no index).
    """
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i:05d}" for i in range(count)]
    if awkward_ids:
        ids[:len(AWKWARD_IDS)] = [f"{prefix}-{a}" for a in AWKWARD_IDS][:count]
    ids = sorted(ids)
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    neighbors = _top_k(ids, vectors, top_k)

    for sub in ("features", "neighbors", "index"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    bounds = np.linspace(0, count, shards + 1).astype(int)
    # The pipeline's own features schema, so the fixture follows the contract.
    schema = features_schema(
        ResolvedModel(name=MODEL, handle="", model_id=MODEL, input_size=224, dim=dim),
        CatalogInfo(input="catalog.csv", kind="csv"))
    for shard in range(shards):
        lo, hi = bounds[shard], bounds[shard + 1]
        part = ids[lo:hi]
        table = pa.table({
            "product_id": part,
            "image": [f"images/{i}.jpg" for i in range(lo, hi)],
            "embedding": pa.array([v.tolist() for v in vectors[lo:hi]], pa.list_(pa.float32())),
            "model": [MODEL] * len(part),
            "sha256": ["0" * 64] * len(part),
            "width": pa.array([32] * len(part), pa.int32()),
            "height": pa.array([24] * len(part), pa.int32()),
            "etag": [None] * len(part),
            "last_modified": [None] * len(part),
        }, schema=schema)
        name = f"{shard:05d}-of-{shards:05d}"
        pq.write_table(table, os.path.join(path, "features", f"features-{name}.parquet"))
        with open(os.path.join(path, "neighbors", f"neighbors-{name}.jsonl"), "w",
                  encoding="utf-8") as handle:
            for pid in part:
                handle.write(json.dumps({"product_id": pid, "neighbors": [
                    {"product_id": n, "similarity": s} for n, s in neighbors[pid]]},
                    ensure_ascii=False) + "\n")
        with open(os.path.join(path, f"similar_products-{name}.jsonl"), "w",
                  encoding="utf-8") as handle:
            for pid in part:
                for n, s in neighbors[pid]:
                    handle.write(json.dumps({"similarity": s, "master_pi": pid, "similar_pi": n},
                                            ensure_ascii=False) + "\n")
    with open(os.path.join(path, "index", "meta.json"), "w") as handle:
        json.dump({"model": MODEL, "dim": dim, "metric": "angular", "n_trees": 10, "seed": seed,
                   "count": count}, handle)
    if complete:
        manifest = {
            "model": MODEL, "dim": dim, "top_k": top_k, "seed": seed, "output": path,
            "counts": {"input": count, "embedded": count, "failed": 0},
            "neighbors": {"products": count if manifest_products is None else manifest_products,
                          "pairs": sum(len(v) for v in neighbors.values()), "shards": shards},
            "timings": {"finished_at": f"2024-01-01T00:00:{seed % 60:02d}Z",
                        "wall_seconds": 1.0},
        }
        if features_only:
            manifest.pop("neighbors")
            for sub in ("neighbors", "index"):
                for name in os.listdir(os.path.join(path, sub)):
                    os.unlink(os.path.join(path, sub, name))
        with open(os.path.join(path, "manifest.json"), "w") as handle:
            json.dump(manifest, handle)
    return FakeRun(path, ids, vectors, neighbors, MODEL, top_k)


def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def assert_reload_is_atomic_under_a_reader(tmp_path, load, connect, db_error) -> FakeRun:
    """Reload new, old, new runs while another connection counts neighbour rows in a loop.

    ``load(run_path)`` loads a run and returns the exit code; ``connect()`` opens a
    reader connection; ``db_error`` is the driver's error class. The reader must only
    ever see the old run's 3,000 rows or the new run's 1,200 — never a missing, empty
    or half-loaded table. Returns the new run, for store-specific checks.
    """
    old = write_run(str(tmp_path / "old"), count=300, top_k=10, seed=1)
    new = write_run(str(tmp_path / "new"), count=120, top_k=10, seed=2, prefix="n")
    assert load(old.path) == 0
    seen, errors, stop = [], [], threading.Event()

    def reader():
        conn = connect()
        try:
            while not stop.is_set():
                try:
                    seen.append(conn.execute("SELECT count(*) FROM product_neighbors"
                                             ).fetchone()[0])
                except db_error as exc:
                    errors.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        wait_for(lambda: seen)  # the reader is reading before the first swap
        for run in (new, old, new):
            assert load(run.path) == 0
        wait_for(lambda: seen and seen[-1] == 1200)
    finally:
        stop.set()
        thread.join()

    assert errors == []
    assert set(seen) <= {3000, 1200}, "a reader saw a missing, empty or half-loaded table"
    assert {3000, 1200} <= set(seen) and len(seen) > 20
    return new


def neighbor_lists(conn, table: str = "product_neighbors") -> dict[str, list]:
    """{product_id: [(rank, neighbor_id, similarity), …]} read through an open DB-API connection."""
    rows = conn.execute(f"SELECT product_id, rank, neighbor_id, similarity FROM {table} "
                        f"ORDER BY product_id, rank").fetchall()
    out: dict[str, list] = {}
    for product_id, rank, neighbor_id, similarity in rows:
        out.setdefault(product_id, []).append((rank, neighbor_id, similarity))
    return out
