"""The kernels behind bench/quality_rerank.py's candidate table (issue 20, part 2).

The table's figures are only as good as these: the Gram-matrix whitening must be
the pipeline's whitening, the grid cells must cover the map as documented, and
diffusion must follow the data manifold rather than raw cosine. Synthetic, numpy
only, milliseconds.
"""

from __future__ import annotations

import numpy as np

from bench.quality_rerank import diffusion, grid_pool, normalised, whiten
from pipeline import postprocess


def test_gram_whitening_equals_the_pipelines_covariance_whitening():
    rng = np.random.default_rng(0)
    # Fewer vectors than dimensions: the Gram path; the same data through fit_whitening.
    vectors = postprocess.unit_rows(rng.normal(size=(40, 60)) * np.linspace(3, 0.1, 60))
    gram = whiten(vectors, 10, 0.25)
    cov = postprocess.apply_whitening(vectors, postprocess.fit_whitening(vectors, 10, 0.25))
    assert gram.shape == cov.shape == (40, 10)
    # Axes may differ in sign; every cosine between products must not.
    assert np.allclose(gram @ gram.T, cov @ cov.T, atol=1e-4)


def test_grid_cells_cover_the_map_and_overlap_by_one_row_when_uneven():
    fmap = np.zeros((1, 7, 7, 2), np.float32)
    fmap[0, 3, :, 0] = 1.0  # the middle row: inside both halves of a 2x2 grid of 7 rows
    fmap[0, 0, 0, 1] = 1.0  # the top-left corner: only the first cell
    cells = grid_pool(fmap, 2).reshape(4, 2)
    assert np.all(cells[:, 0] > 0)  # every cell sees the shared middle row
    assert cells[0, 1] > 0 and np.all(cells[1:, 1] == 0)
    assert grid_pool(np.ones((3, 9, 9, 5), np.float32), 3).shape == (3, 45)


def test_diffusion_ranks_a_same_manifold_item_above_a_closer_cross_manifold_one():
    angles = np.arange(21) * 0.05
    chain_a = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=1)
    chain_b = postprocess.unit_rows(chain_a + np.array([0.0, 0.0, 0.15]))
    vectors = postprocess.unit_rows(np.vstack([chain_a, chain_b]))
    query, same_far, other_near = 0, 6, 21  # a[0]; a[6] along its chain; b[0] beside it
    cosine = vectors @ vectors.T
    assert cosine[query, other_near] > cosine[query, same_far]
    f = normalised(diffusion(vectors, k=3, alpha=0.99))
    assert f[query, same_far] > f[query, other_near]
