"""Catalogue-structured synthetic embeddings: categories → product types → models → variants.

Not isotropic blobs: a decaying spectrum (axis j scaled by (1 + j)^-0.5, as real
embeddings concentrate variance in few directions), Zipf-like group sizes at every
level, and variants of one model close together. Returns unit float32 vectors and
the category / product type / model labels of each row.
"""

from __future__ import annotations

import numpy as np


def _zipf_sizes(rng, total: int, groups: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, groups + 1) ** 1.1
    rng.shuffle(weights)
    return rng.multinomial(total, weights / weights.sum())


def catalog_vectors(n: int, dim: int = 256, seed: int = 0, out=None):
    """(vectors [n, dim] float32 unit, categories, product_types, models) for ``n`` products.

    ``out``: an ``[n, dim]`` float32 array (e.g. a ``.npy`` memmap) to write the
    vectors into, so a benchmark at 1M x 1280 does not hold them twice; the
    values are the same either way.
    """
    rng = np.random.default_rng(seed)
    spectrum = (1.0 + np.arange(dim)) ** -0.5
    n_models = max(1, n // 4)  # ~4 variants per model, Zipf-spread
    n_types = max(1, n_models // 60)
    n_cats = max(1, n_types // 15)
    cat_c = rng.standard_normal((n_cats, dim))
    type_of_cat = rng.integers(0, n_cats, n_types)
    type_c = cat_c[type_of_cat] + 0.8 * rng.standard_normal((n_types, dim))
    type_of_model = np.repeat(np.arange(n_types), _zipf_sizes(rng, n_models, n_types))
    model_c = type_c[type_of_model] + 0.6 * rng.standard_normal((n_models, dim))
    model_of_row = np.repeat(np.arange(n_models), _zipf_sizes(rng, n, n_models))
    rng.shuffle(model_of_row)
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):
        rows = model_of_row[start:start + 50_000]
        x = (model_c[rows] + 0.3 * rng.standard_normal((len(rows), dim))) * spectrum
        out[start:start + len(rows)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    types = type_of_model[model_of_row]
    return out, type_of_cat[types], types, model_of_row
