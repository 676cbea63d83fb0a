"""Build the search index once all features are written.

The index needs every vector in one place, so it is built by one worker after
the feature shards are final (their file names are this step's input). It
writes ``OUT/index/``: the Annoy index (angular, seeded), the vectors as
``.npy`` (row-aligned, memory-mappable, no pickle), the row → product id map
as Parquet, and ``meta.json``. Query workers then memory-map those files.
"""

from __future__ import annotations

import os
import tempfile
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import files, similarity_search
from pipeline.features import read_feature_matrix

INDEX_DIR = "index"
ANNOY_FILE = "annoy.ann"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.parquet"
META_FILE = "meta.json"


class BuildIndexFn(beam.DoFn):
    """All feature shard paths → the index files; yields the index description."""

    def __init__(self, output_dir: str, model_id: str, top_k: int, search: str,
                 n_trees: int, search_k: int, seed: int):
        self._output_dir = output_dir
        self._model_id = model_id
        self._top_k = top_k
        self._search = search
        self._n_trees = n_trees
        self._search_k = search_k
        self._seed = seed

    def process(self, feature_paths):
        started = time.time()
        matrix = read_feature_matrix(sorted(feature_paths))
        if matrix.model_id not in (None, self._model_id):
            raise ValueError(f"features were made by {matrix.model_id}, not by this run's "
                             f"model {self._model_id}")
        n, dim = matrix.vectors.shape if matrix.count else (0, 0)
        search = similarity_search.choose_search(n, self._search)
        n_trees = self._n_trees or similarity_search.default_n_trees(n, dim)
        candidates = similarity_search.default_candidates(self._top_k)
        search_k = self._search_k or similarity_search.default_search_k(n_trees, candidates)
        index_dir = files.join(self._output_dir, INDEX_DIR)
        with tempfile.TemporaryDirectory(prefix="similarity-index-") as local:
            similarity_search.save_vectors(os.path.join(local, VECTORS_FILE), matrix.vectors)
            ids = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)),
                            "product_id": pa.array(matrix.product_ids, type=pa.string())})
            pq.write_table(ids, os.path.join(local, IDS_FILE))
            names = [VECTORS_FILE, IDS_FILE]
            if n:
                similarity_search.build_annoy_index(
                    matrix.vectors, os.path.join(local, ANNOY_FILE), n_trees, self._seed)
                names.append(ANNOY_FILE)
            for name in names:
                files.upload_file(os.path.join(local, name), files.join(index_dir, name))
        meta = {
            "model": self._model_id,
            "dim": int(dim),
            "metric": "angular",
            "n_trees": int(n_trees),
            "seed": int(self._seed),
            "count": int(n),
            "search": search,
            "search_k": int(search_k),
            "candidates": int(candidates),
            "top_k": int(self._top_k),
            "files": {"annoy": ANNOY_FILE if n else None, "vectors": VECTORS_FILE,
                      "ids": IDS_FILE},
            "build_seconds": round(time.time() - started, 3),
        }
        files.write_json(files.join(index_dir, META_FILE), meta)
        yield dict(meta, index_dir=index_dir)


class BuildIndex(beam.PTransform):
    """Feature file names (after the write is final) → one index description."""

    def __init__(self, output_dir: str, model_id: str, top_k: int, search: str = "auto",
                 n_trees: int = 0, search_k: int = 0, seed: int = 42):
        super().__init__()
        self._fn = BuildIndexFn(output_dir, model_id, top_k, search, n_trees, search_k, seed)

    def expand(self, feature_paths):
        return (feature_paths
                | "AllShards" >> beam.combiners.ToList()
                | "Build" >> beam.ParDo(self._fn))
