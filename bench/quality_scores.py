"""The ``score`` half of bench/quality_candidates.py: candidate recipes on cached arrays.

Every candidate maps the cached backbone arrays to search-space vectors (and, for
query expansion, query vectors); precision@10 is then the share of each product's
10 exact-cosine neighbours (itself excluded) with its label, over every product.
Labels are read only here, to score; no candidate sees them.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from pipeline import postprocess, similarity_search
from pipeline.postprocess import unit_rows

K = 10


def read_catalog(path: str) -> list[dict]:
    """Rows of the labelled catalogue, sorted by product id (the pipeline's order)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    root = os.path.dirname(path)
    for row in rows:
        row["path"] = os.path.join(root, row["image"])
    return sorted(rows, key=lambda r: r["product_id"])


def load(cache: str, name: str) -> np.ndarray:
    """One cached view (``lite0_gap``…), L2-normalised rows."""
    return unit_rows(np.load(os.path.join(cache, name + ".npy"), allow_pickle=False))


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray | None = None,
                   k: int = K) -> float:
    """Share of same-label products among every product's top-``k`` (itself excluded)."""
    rows = np.arange(len(vectors))
    idx, _ = similarity_search.exact_top_k(vectors if queries is None else queries, vectors, k,
                                           query_rows=rows)
    return float((labels[idx] == labels[:, None]).mean())


def k_reciprocal(vectors: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3
                 ) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017), dense: a [N, N] *similarity* matrix.

    Only for the benchmark (O(N^2) memory); returns 1 - final distance.
    """
    n = len(vectors)
    sims = vectors @ vectors.T
    dist = np.maximum(2 - 2 * sims, 0)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k1 + 1]
    v = np.zeros((n, n), np.float32)
    for i in range(n):
        forward = order[i]
        recip = forward[np.any(order[forward, :k1 + 1] == i, axis=1)]
        expanded = recip
        for c in recip:
            cf = order[c, :int(round(k1 / 2)) + 1]
            crecip = cf[np.any(order[cf, :int(round(k1 / 2)) + 1] == c, axis=1)]
            if len(np.intersect1d(crecip, recip)) > 2 / 3 * len(crecip):
                expanded = np.append(expanded, crecip)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 > 1:
        v = v[order[:, :k2]].mean(axis=1)
    minimum = np.minimum
    jaccard = np.zeros((n, n), np.float32)
    for i in range(n):
        nz = np.nonzero(v[i])[0]
        jaccard[i] = 1 - minimum(v[i, nz][None], v[:, nz]).sum(axis=1) / (
            2 - minimum(v[i, nz][None], v[:, nz]).sum(axis=1))
    final = jaccard * (1 - lam) + dist * lam
    return 1 - final


def precision_from_sims(sims: np.ndarray, labels: np.ndarray, k: int = K) -> float:
    """precision@k from a dense similarity matrix (the diagonal excluded)."""
    sims = sims.copy()
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return float((labels[idx] == labels[:, None]).mean())


def cmd_score(args) -> int:
    """Print the candidate table (see the module docstring)."""

    ids = json.load(open(os.path.join(args.cache, "ids.json")))
    rows = {r["product_id"]: r for r in read_catalog(args.catalog)}
    labels = {c: np.array([rows[i][c] for i in ids]) for c in ("articleType", "subCategory")}
    timings = json.load(open(os.path.join(args.cache, "timings.json")))
    base = timings["lite0"]["seconds"]

    def cost(*views):
        return sum(timings[v]["seconds"] for v in views) / base

    def have(name):
        return os.path.exists(os.path.join(args.cache, name + ".npy"))
    table = []

    def report(name, vectors, views, queries=None, sims=None):
        if sims is not None:
            at, sc = (precision_from_sims(sims, labels[c]) for c in ("articleType", "subCategory"))
        else:
            at, sc = (precision_at_k(vectors, labels[c], queries)
                      for c in ("articleType", "subCategory"))
        table.append((name, at, sc, vectors.shape[1], cost(*views)))
        print(f"{name:58s} {at:.4f} {sc:.4f} {vectors.shape[1]:5d} {cost(*views):5.2f}x",
              flush=True)

    print(f"{'candidate':58s} P@10aT P@10sC   dim  cost")
    lite0 = load(args.cache, "lite0_gap")
    report("lite0 GAP (fast)", lite0, ["lite0"])
    for dim in (128, 256, 512):
        w = postprocess.fit_whitening(lite0, dim, power=0.0)
        report(f"lite0 + PCA-{dim}", postprocess.apply_whitening(lite0, w), ["lite0"])
    for power in (0.25, 0.5):
        for shrink in (0.0, 0.1, 1.0):
            for dim in (256, 512):
                w = postprocess.fit_whitening(lite0, dim, power=power, shrinkage=shrink)
                report(f"lite0 + whiten p={power} s={shrink} d={dim}",
                       postprocess.apply_whitening(lite0, w), ["lite0"])
    for pool in ("max", "gem"):
        report(f"lite0 {pool}", load(args.cache, f"lite0_{pool}"), ["lite0"])
    w = postprocess.fit_whitening(lite0, 256, power=0.0)
    pca = postprocess.apply_whitening(lite0, w)
    for k in (3, 5, 10):
        for alpha in (0.0, 3.0):
            report(f"lite0 + PCA-256 + DBA k={k} a={alpha}",
                   postprocess.database_augmentation(pca, k, alpha), ["lite0"])
    dba = postprocess.database_augmentation(pca, 5, 3.0)
    for k in (3, 5, 10):
        report(f"lite0 + PCA-256 + DBA5 + QE k={k}", dba,
               ["lite0"], queries=postprocess.query_expansion(
                   dba, dba, k, 3.0, query_rows=np.arange(len(dba))))
    if have("lite0_flip_gap"):
        tta = unit_rows(lite0 + load(args.cache, "lite0_flip_gap"))
        report("lite0 flip-TTA", tta, ["lite0", "lite0_flip"])
        w = postprocess.fit_whitening(tta, 256, power=0.0)
        report("lite0 flip-TTA + PCA-256 + DBA5", postprocess.database_augmentation(
            postprocess.apply_whitening(tta, w), 5, 3.0), ["lite0", "lite0_flip"])
    if have("lite2_gap"):
        lite2 = load(args.cache, "lite2_gap")
        report("lite2 GAP", lite2, ["lite2"])
        for pool in ("max", "gem"):
            report(f"lite2 {pool}", load(args.cache, f"lite2_{pool}"), ["lite2"])
        cat = unit_rows(np.hstack([lite0, lite2]))
        report("lite0+lite2 concat", cat, ["lite0", "lite2"])
        w = postprocess.fit_whitening(cat, 256, power=0.0)
        report("lite0+lite2 + PCA-256 + DBA5", postprocess.database_augmentation(
            postprocess.apply_whitening(cat, w), 5, 3.0), ["lite0", "lite2"])
    report("lite0 + PCA-256 k-reciprocal", pca, ["lite0"], sims=k_reciprocal(pca))
    out = os.path.join(args.cache, "scores.json")
    with open(out, "w") as handle:
        json.dump([dict(zip(("candidate", "p10_articleType", "p10_subCategory", "dim", "cost"),
                            r)) for r in table], handle, indent=1)
    return 0
