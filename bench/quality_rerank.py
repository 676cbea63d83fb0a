"""Issue 20, part 2: re-ranking, query expansion and region-grid pooling on cached arrays.

``python bench/quality_rerank.py [--cache=/tmp/quality_cache] [--catalog=…] [--quick]``
prints one table, candidate by candidate: precision@10 by articleType and by
subCategory over all 4,765 shared products (the scoring of
``bench/quality_scores.py``: each product's 10 nearest, itself excluded), the
seconds the candidate's catalogue-side step took on those products with the CPU
steal during it, and the embedding passes it needs (``lite0``, ``lite2`` or both).
Nothing is fitted to the labels; they only score.

It needs the cache of ``python bench/quality_candidates.py embed --views
lite0,lite2`` (``<view>_gap.npy`` and the feature maps ``<view>_map.npy``).

Candidates:

* on ``best``'s space (Lite2 GAP, PCA-512 power 0.15, DBA-10): alpha-query expansion
  on the query side (each product's query is itself plus its top-k, weights
  similarity^3, searched against the DBA vectors); a second DBA round;
  k-reciprocal re-ranking (Zhong et al. 2017: Jaccard distance of k-reciprocal
  neighbour sets, mixed with the original distance); diffusion on the mutual kNN
  graph (Iscen et al. 2017: W = sim^3 on the mutual top-k, S = D^-1/2 W D^-1/2,
  F = (I - alpha S)^-1, solved exactly here since N is small), ranked by F itself,
  by F normalised to F_ij / sqrt(F_ii F_jj) (the cosine of the spectral embedding,
  which removes the hub bias of high-degree nodes), and by cosine + beta * that;
* region-grid pooling of the last feature map: the map cut into g x g cells
  (overlapping by one row/column where h is not a multiple of g), each cell
  average-pooled and L2-normalised, the cells concatenated — the layout of the
  product (where the sleeves, the sole, the strap are) that GAP averages away;
  then the same PCA whitening (fitted through the N x N Gram matrix, since D >
  N) and DBA;
* the two backbones' whitened grid vectors concatenated, with and without the
  re-ranking steps above.

``--quick`` skips the O(N^2)-memory re-rankers (k-reciprocal, diffusion).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cpu_steal import StealMeter
from bench.quality_candidates import DEFAULT_CACHE, DEFAULT_CATALOG
from bench.quality_scores import k_reciprocal, load, precision_at_k, read_catalog
from pipeline import postprocess
from pipeline.postprocess import unit_rows

K = 10


def grid_pool(fmap: np.ndarray, cells: int) -> np.ndarray:
    """[N, h, w, C] feature maps → [N, cells * cells * C]: each cell average-pooled and
    L2-normalised, cells in row-major order, then the whole vector L2-normalised.

    Cell i spans rows floor(i h / cells) .. ceil((i + 1) h / cells), so cells overlap
    by one row where h is not a multiple of ``cells``."""
    h, w = fmap.shape[1:3]
    rows = [(int(np.floor(i * h / cells)), int(np.ceil((i + 1) * h / cells)))
            for i in range(cells)]
    cols = [(int(np.floor(j * w / cells)), int(np.ceil((j + 1) * w / cells)))
            for j in range(cells)]
    parts = [unit_rows(fmap[:, r0:r1, c0:c1].astype(np.float32).mean(axis=(1, 2)))
             for r0, r1 in rows for c0, c1 in cols]
    return unit_rows(np.hstack(parts))


def whiten(vectors: np.ndarray, dim: int, power: float) -> np.ndarray:
    """PCA to ``dim`` axes, each scaled by eigenvalue ** -power, L2-normalised: the same
    transform as ``postprocess.fit_whitening`` (no shrinkage), fitted through the N x N
    Gram matrix when there are fewer vectors than dimensions (a 11,520 x 11,520
    covariance would take minutes to decompose)."""
    import scipy.linalg

    n, d = vectors.shape
    if d <= n:
        w = postprocess.fit_whitening(vectors, dim, power=power)
        return postprocess.apply_whitening(vectors, w)
    x = vectors.astype(np.float64)
    centered = x - x.mean(axis=0)
    gram = centered @ centered.T / (n - 1)
    values, u = scipy.linalg.eigh(gram, subset_by_index=[n - dim, n - 1])
    values, u = values[::-1], u[:, ::-1]
    # Projections on the principal axes: centered @ axes = u * sqrt(values * (n - 1)).
    return unit_rows(u * np.sqrt(values * (n - 1)) * np.power(values, -power))


def mutual_knn_affinity(vectors: np.ndarray, k: int, gamma: float = 3.0):
    """Sparse W: sim^gamma on the mutual top-``k`` graph (itself excluded), symmetric."""
    import scipy.sparse as sp

    n = len(vectors)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argpartition(-sims, k, axis=1)[:, :k]
    vals = np.power(np.maximum(sims[np.arange(n)[:, None], idx], 0.0), gamma)
    w = sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    return w.minimum(w.T)


def diffusion(vectors: np.ndarray, k: int = 50, alpha: float = 0.99) -> np.ndarray:
    """Dense F = (I - alpha S)^-1, S = D^-1/2 W D^-1/2 (exact: N is 4,765 here)."""
    import scipy.sparse as sp

    w = mutual_knn_affinity(vectors, k)
    degree = np.asarray(w.sum(axis=1)).ravel()
    dinv = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    s = (dinv @ w @ dinv).toarray()
    return np.linalg.inv(np.eye(len(vectors)) - alpha * s)


def spectral_embedding(vectors: np.ndarray, k: int = 50, alpha: float = 0.99,
                       rank: int = 512) -> np.ndarray:
    """Unit rows of U_r diag(1 / (1 - alpha lambda_r)) ** 0.5 from the ``rank`` largest
    eigenpairs of S: their inner products approximate F = (I - alpha S)^-1, so their
    cosine approximates :func:`normalised` diffusion as *vectors* (an index can hold them)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    w = mutual_knn_affinity(vectors, k)
    degree = np.asarray(w.sum(axis=1)).ravel()
    dinv = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    s = dinv @ w @ dinv
    values, u = spl.eigsh(s, k=rank, which="LA", v0=np.ones(len(vectors)))
    return unit_rows(u * np.sqrt(1.0 / (1.0 - alpha * values)))


def normalised(f: np.ndarray) -> np.ndarray:
    """F_ij / sqrt(F_ii F_jj): the cosine of the spectral embedding F = V V^T."""
    d = np.sqrt(np.maximum(np.diag(f), 1e-12))
    return f / d[:, None] / d[None, :]


def precision_from_sims(sims: np.ndarray, labels: np.ndarray, k: int = K) -> float:
    """precision@k from a dense similarity matrix, the diagonal excluded (ties by row)."""
    sims = np.array(sims, dtype=np.float64)
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return float((labels[idx] == labels[:, None]).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", default=DEFAULT_CATALOG)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--quick", action="store_true",
                        help="skip k-reciprocal and diffusion (dense N x N)")
    args = parser.parse_args(argv)
    ids = json.load(open(os.path.join(args.cache, "ids.json")))
    rows = {r["product_id"]: r for r in read_catalog(args.catalog)}
    labels = {c: np.array([rows[i][c] for i in ids]) for c in ("articleType", "subCategory")}
    table = []
    print(f"{len(ids)} products; seconds = the catalogue-side step on them")
    print(f"{'candidate':62s} P@10aT P@10sC      s  embeds")

    def report(name, seconds, embeds, steal, vectors=None, queries=None, sims=None):
        if sims is not None:
            at, sc = (precision_from_sims(sims, labels[c]) for c in labels)
        else:
            at, sc = (precision_at_k(vectors, labels[c], queries) for c in labels)
        steal_text = "" if steal is None else f"  steal {100 * steal:.0f} %"
        print(f"{name:62s} {at:.4f} {sc:.4f} {seconds:6.2f}  {embeds}{steal_text}",
              flush=True)
        table.append({"candidate": name, "p10_articleType": round(at, 4),
                      "p10_subCategory": round(sc, 4), "seconds": round(seconds, 2),
                      "embeds": embeds, "steal": steal})

    def timed(fn):
        with StealMeter() as meter:
            out = fn()
        return out, meter

    dba = postprocess.database_augmentation
    lite0 = load(args.cache, "lite0_gap")
    lite2 = load(args.cache, "lite2_gap")
    report("fast: lite0 GAP", 0.0, "lite0", None, lite0)
    space, m = timed(lambda: dba(whiten(lite0, 256, 0.2), 10, 3.0))
    report("balanced: lite0 GAP, PCA-256 p0.2, DBA-10", m.seconds, "lite0", m.steal, space)
    best, m = timed(lambda: dba(whiten(lite2, 512, 0.15), 10, 3.0))
    base_s = m.seconds
    report("best: lite2 GAP, PCA-512 p0.15, DBA-10", base_s, "lite2", m.steal, best)
    for qk in (3, 5, 10):
        q, m = timed(lambda qk=qk: postprocess.query_expansion(best, best, qk, 3.0,
                                                                 query_rows=np.arange(len(best))))
        report(f"best + alpha-QE k={qk} (query side)", base_s + m.seconds, "lite2", m.steal,
               best, queries=q)
    twice, m = timed(lambda: dba(best, 10, 3.0))
    report("best + a second DBA-10 round", base_s + m.seconds, "lite2", m.steal, twice)
    if not args.quick:
        for k1, k2, lam in ((20, 6, 0.3), (30, 6, 0.3)):
            sims, m = timed(lambda k1=k1, k2=k2, lam=lam: k_reciprocal(best, k1, k2, lam))
            report(f"best + k-reciprocal k1={k1} k2={k2} lambda={lam}", base_s + m.seconds,
                   "lite2", m.steal, sims=sims)
        for k, alpha in ((50, 0.9), (50, 0.99)):
            f, m = timed(lambda k=k, alpha=alpha: diffusion(best, k, alpha))
            report(f"best + diffusion k={k} alpha={alpha}", base_s + m.seconds, "lite2",
                   m.steal, sims=f)
        f = normalised(f)
        report("best + diffusion, normalised", base_s + m.seconds, "lite2", m.steal, sims=f)
        report("best + cosine + 2 x normalised diffusion", base_s + m.seconds, "lite2",
               m.steal, sims=best @ best.T + 2.0 * f)
    cat, m = timed(lambda: dba(unit_rows(np.hstack(
        [whiten(lite0, 512, 0.15), whiten(lite2, 512, 0.15)])), 10, 3.0))
    report("lite0 GAP (+) lite2 GAP, each PCA-512 p0.15, DBA-10", m.seconds, "both", m.steal,
           cat)
    grids = {}
    for view in ("lite0", "lite2"):
        fmap = np.load(os.path.join(args.cache, f"{view}_map.npy"), allow_pickle=False)
        for cells in (2, 3):
            grids[view, cells] = grid_pool(fmap, cells)  # part of the embedding pass
        del fmap
    # Seconds of a row = every catalogue-side step it needs (whitening,
    # DBA, re-ranking), each timed once and summed where a later row reuses it.
    whitened, white_s = {}, {}
    for view, cells in sorted(grids):
        white, m = timed(lambda v=grids[view, cells]: whiten(v, 512, 0.15))
        whitened[view, cells], white_s[view, cells] = white, m.seconds
        space, m = timed(lambda white=white: dba(white, 10, 3.0))
        report(f"{view} {cells}x{cells} grid, PCA-512 p0.15, DBA-10",
               white_s[view, cells] + m.seconds, view, m.steal, space)
    grid3, pair_s = None, 0.0
    for cells in (2, 3):
        cat, m = timed(lambda cells=cells: dba(unit_rows(np.hstack(
            [whitened["lite0", cells], whitened["lite2", cells]])), 10, 3.0))
        pair_s = white_s["lite0", cells] + white_s["lite2", cells] + m.seconds
        report(f"lite0 {cells}x{cells} (+) lite2 {cells}x{cells}, each PCA-512, DBA-10",
               pair_s, "both", m.steal, cat)
        grid3 = cat
    assert grid3 is not None
    for qk in (3, 5):
        q, m = timed(lambda qk=qk: postprocess.query_expansion(
            grid3, grid3, qk, 3.0, query_rows=np.arange(len(grid3))))
        report(f"  the 3x3 pair + alpha-QE k={qk} (query side)", pair_s + m.seconds, "both",
               m.steal,
               vectors=grid3, queries=q)
    if not args.quick:
        f, m = timed(lambda: normalised(diffusion(grid3, 50, 0.99)))
        report("  the 3x3 pair + cosine + 2 x normalised diffusion", pair_s + m.seconds, "both",
               m.steal, sims=grid3 @ grid3.T + 2.0 * f)
        for rank in (256, 512):
            # cosine + 2 x spectral cosine = the cosine of [x, sqrt(2) v]: plain vectors.
            both, m = timed(lambda rank=rank: unit_rows(np.hstack(
                [grid3, np.sqrt(2.0) * spectral_embedding(grid3, 50, 0.99, rank)])))
            report(f"  the 3x3 pair (+) sqrt(2) x spectral embedding r={rank} (vectors)",
                   pair_s + m.seconds, "both", m.steal, both)
    out = os.path.join(args.cache, "rerank_scores.json")
    with open(out, "w") as handle:
        json.dump(table, handle, indent=1)
    print(f"table: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
