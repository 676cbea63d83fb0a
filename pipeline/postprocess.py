"""Catalogue-dependent post-processing of embeddings: whitening, DBA, query expansion.

Plain numpy, no Beam. Every function is deterministic for a given input (rows in
product-id order, fixed seeds, float64 where sums are taken), so a run that reuses
its backbone vectors and recomputes this step gets the same bytes as a full
rebuild.

* :func:`fit_whitening` / :func:`apply_whitening`: PCA fitted on the catalogue's
  own vectors, each axis scaled by ``(eigenvalue + shrinkage * mean eigenvalue) **
  -power`` (power 0: plain PCA rotation; 0.5: full whitening; in between: the
  power-law variant; shrinkage keeps the weak axes from being blown up), then
  L2-normalised so cosine stays the similarity.
* :func:`database_augmentation` (DBA): each vector replaced by the normalised,
  similarity-weighted mean of itself and its ``k`` nearest neighbours — the
  catalogue's own neighbourhood smooths each product's vector.
* :func:`query_expansion` (alpha-QE): the same for a query vector against a
  database, with weights ``similarity ** alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import similarity_search

# Rows sampled to fit the whitening: plenty for a 1280 x 1280 covariance, bounded memory.
FIT_ROWS = 100_000


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening: ``unit((x - mean) @ projection)``."""

    mean: np.ndarray  # [D] float32
    projection: np.ndarray  # [D, d] float32 (axes already scaled)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def fit_whitening(vectors: np.ndarray, dim: int = 0, power: float = 0.5,
                  shrinkage: float = 0.0, seed: int = 0) -> Whitening:
    """Fit PCA whitening on the catalogue's vectors ([N, D]) without any label.

    ``dim`` axes are kept (0 or more than available: every axis with a non-zero
    eigenvalue, at most ``N - 1``). Each axis is scaled by ``(eigenvalue +
    shrinkage * mean(eigenvalues)) ** -power``; the sign of each axis is fixed so
    the same vectors always give the same projection.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n < 2:
        raise ValueError(f"whitening needs at least 2 vectors, got {n}")
    rng = np.random.default_rng(seed)
    sample = vectors if n <= FIT_ROWS else vectors[
        np.sort(rng.choice(n, FIT_ROWS, replace=False))]
    mean = sample.mean(axis=0, dtype=np.float64)
    centered = sample.astype(np.float64) - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / (len(sample) - 1))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    usable = int(np.sum(eigenvalues > eigenvalues[0] * 1e-9)) if eigenvalues[0] > 0 else 1
    keep = min(usable, len(sample) - 1, d) if dim <= 0 else min(dim, usable, len(sample) - 1, d)
    keep = max(keep, 1)
    values, axes = eigenvalues[:keep], eigenvectors[:, :keep]
    axes = axes * np.where(axes[np.abs(axes).argmax(axis=0), np.arange(keep)] < 0, -1.0, 1.0)
    scale = np.power(values + shrinkage * eigenvalues[:usable].mean(), -power)
    return Whitening(mean.astype(np.float32), (axes * scale).astype(np.float32))


def apply_whitening(vectors: np.ndarray, whitening: Whitening) -> np.ndarray:
    """Vectors in the whitened space, L2-normalised (float32 [N, d])."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return unit_rows((vectors - whitening.mean) @ whitening.projection)


def _weighted_mean(vectors: np.ndarray, own: np.ndarray, idx: np.ndarray, sims: np.ndarray,
                   alpha: float) -> np.ndarray:
    """unit(own + sum_j max(sim_j, 0) ** alpha * vectors[idx_j]) per row, in float64."""
    weights = np.power(np.maximum(sims.astype(np.float64), 0.0), alpha)
    out = own.astype(np.float64).copy()
    for j in range(idx.shape[1]):
        out += weights[:, j:j + 1] * vectors[idx[:, j]].astype(np.float64)
    return unit_rows(out)


def database_augmentation(vectors: np.ndarray, k: int, alpha: float = 3.0,
                          block_rows: int = 4096) -> np.ndarray:
    """DBA: each unit vector → unit(itself + its ``k`` nearest neighbours weighted by
    ``similarity ** alpha``), neighbours found by exact cosine among ``vectors``.

    Why: products of one kind sit in a neighbourhood; averaging over it moves each
    vector towards that kind and away from its own photo's accidents. ``k = 0``
    returns the vectors unchanged.
    """
    vectors = unit_rows(vectors)
    if k <= 0 or len(vectors) < 2:
        return vectors
    out = np.empty_like(vectors)
    for start in range(0, len(vectors), block_rows):
        rows = np.arange(start, min(start + block_rows, len(vectors)))
        idx, sims = similarity_search.exact_top_k(vectors[rows], vectors, k, query_rows=rows)
        out[rows] = _weighted_mean(vectors, vectors[rows], idx, sims, alpha)
    return out


def query_expansion(queries: np.ndarray, database: np.ndarray, k: int, alpha: float = 3.0,
                    query_rows: np.ndarray | None = None) -> np.ndarray:
    """alpha-QE: each query → unit(query + its ``k`` nearest database vectors weighted by
    ``similarity ** alpha``). ``query_rows`` excludes a query's own database row."""
    queries = unit_rows(queries)
    if k <= 0 or len(database) < 2:
        return queries
    idx, sims = similarity_search.exact_top_k(queries, database, k, query_rows=query_rows)
    return _weighted_mean(database, queries, idx, sims, alpha)
