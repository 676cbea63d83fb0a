"""The run's search space: backbone vectors → post-processed vectors, and its files.

Called by ``transforms/build_index.py`` where the whole catalogue's vectors are
already in one place (the whitening is fitted on all of them and DBA needs the
kNN graph of all of them, so a separate stage would only read and write the
matrix once more). Recomputed every run from the backbone vectors in
``features/`` — reused or new — so an incremental run gives the bytes of a full
rebuild. Writes, under ``OUT/index/``:

* ``space.json``: the recipe, the backbone and search dimensions and what
  ``similarity`` means (``pipeline.similarity_index`` reads it);
* ``whitening_mean.npy`` / ``whitening_projection.npy`` when the recipe whitens
  (float32, no pickle): what a new image's vector goes through before the search.
"""

from __future__ import annotations

import numpy as np

from pipeline import files, postprocess
from pipeline.quality import Recipe
from pipeline.run_layout import SPACE_FILE, WHITENING_MEAN_FILE, WHITENING_PROJECTION_FILE


def to_search_space(vectors: np.ndarray, recipe: Recipe, index_root: str) -> np.ndarray:
    """The search-space vectors of ``vectors`` (rows in product-id order) under ``recipe``;
    writes the recipe's files into ``index_root``. Unchanged when the recipe does nothing."""
    if not recipe.postprocessed or len(vectors) < 2:
        return vectors
    space = postprocess.unit_rows(vectors)
    if recipe.whiten_dim:
        whitening = postprocess.fit_whitening(space, recipe.whiten_dim, recipe.whiten_power,
                                              recipe.whiten_shrinkage)
        for name, array in ((WHITENING_MEAN_FILE, whitening.mean),
                            (WHITENING_PROJECTION_FILE, whitening.projection)):
            with files.staged_output(files.join(index_root, name)) as staged:
                np.save(staged, array, allow_pickle=False)
        space = postprocess.apply_whitening(space, whitening)
    if recipe.dba_k:
        space = postprocess.database_augmentation(space, recipe.dba_k, recipe.dba_alpha)
    files.write_json(files.join(index_root, SPACE_FILE), {
        "recipe": recipe.to_dict(),
        "backbone_dim": int(vectors.shape[1]),
        "dim": int(space.shape[1]),
        "whitening": bool(recipe.whiten_dim),
        "similarity": recipe.similarity_definition(),
    })
    return space
