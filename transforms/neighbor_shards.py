"""What the exact/Annoy and the IVF neighbour stages share: the shard writer and the recall check.

Both stages end the same way: one row range's top-k rows and similarities become
its ``neighbors/`` shard and flat-pairs shard (:func:`write_shard`, same contract,
same deterministic names), and the run's recall sample (:func:`recall_rows`) is
checked against exact search (:func:`recall_hits`) wherever the search was
approximate. Kept here so that neither stage imports the other.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from pipeline import files, ivf, neighbor_lines, similarity_search
from pipeline.index_description import ShardWork
from pipeline.run_layout import ANNOY_FILE, IDS_FILE, NEIGHBORS_DIR, NEIGHBORS_PREFIX, VECTORS_FILE
from pipeline.run_layout import PAIRS_PREFIX as FLAT_PREFIX
from transforms.errors import METRICS_NAMESPACE

RECALL_SAMPLE = 1_000  # products per run whose lists are checked against exact search


def recall_rows(count: int, seed: int) -> np.ndarray:
    """The rows of an index whose published lists are checked against exact search."""
    return ivf.sample_rows(count, min(RECALL_SAMPLE, count), seed + 1)


def recall_hits(vectors, rows: np.ndarray, found_sims: np.ndarray, k: int) -> tuple[int, int]:
    """(hits, wanted): published neighbours at least as similar as exact search's k-th.

    Counting by similarity (with a 1e-6 float margin) instead of by id makes
    ties at the k-th place count as found, whichever of the tied products was
    kept.
    """
    if len(rows) == 0 or k == 0:
        return 0, 0
    _, exact_sims = similarity_search.exact_top_k(np.asarray(vectors[rows]), vectors, k,
                                                  query_rows=rows)
    kk = exact_sims.shape[1]
    threshold = exact_sims[:, -1:] - 1e-6
    hits = int((found_sims[:, :kk] >= threshold).sum())
    return hits, int(len(rows) * kk)


def shard_name(prefix: str, shard: int, n_shards: int) -> str:
    """Beam-style shard file name, e.g. ``neighbors-00000-of-00004.jsonl``."""
    return f"{prefix}-{shard:05d}-of-{n_shards:05d}.jsonl"


class _LoadedIndex:
    def __init__(self, index_dir: str, dim: int, has_annoy: bool):
        local = index_dir
        if not files.is_local(index_dir):
            cache = os.path.join(tempfile.gettempdir(), "similarity-index-" + hashlib.sha1(
                index_dir.encode()).hexdigest()[:16])
            for name in (VECTORS_FILE, IDS_FILE) + ((ANNOY_FILE,) if has_annoy else ()):
                files.copy_to_local(files.join(index_dir, name), cache)
            local = cache
        self.vectors = similarity_search.load_vectors(os.path.join(local, VECTORS_FILE),
                                                      mmap=True)
        ids = pq.ParquetFile(os.path.join(local, IDS_FILE)).read()
        self.product_ids = ids.column("product_id").to_pylist()
        self.exclude_keys = (ids.column("exclude_key").to_pylist()
                             if "exclude_key" in ids.column_names else None)
        self.id_json = neighbor_lines.json_strings(self.product_ids)
        self.exclude_codes = (None if self.exclude_keys is None
                              else neighbor_lines.key_codes(self.exclude_keys))
        self.annoy = (similarity_search.open_annoy_index(os.path.join(local, ANNOY_FILE), dim)
                      if has_annoy else None)


NEAR_DUPLICATES = "near_duplicates"  # tag: per shard, a list of (a, b, similarity), a < b


class ShardWriter:
    """What writing a shard needs: the output directory, the list rules and the loaded index.

    Shared by the exact/Annoy stage (``QueryNeighborsFn``) and the IVF merge
    (``MergeWriteFn``), so both write the same contract; the index of the last
    ``index_dir`` asked for stays memory-mapped.
    """

    def __init__(self, output_dir: str, top_k: int, min_similarity: float | None = None,
                 duplicate_threshold: float | None = None):
        self._output_dir = output_dir
        self._top_k = top_k
        self._min_similarity = min_similarity
        self._duplicate_threshold = duplicate_threshold
        self._loaded: dict[str, _LoadedIndex] = {}
        self._queried = Metrics.counter(METRICS_NAMESPACE, "neighbors_queried")

    def _index(self, work: ShardWork) -> _LoadedIndex:
        key = work.index.index_dir
        if key not in self._loaded:
            self._loaded = {key: _LoadedIndex(key, work.index.dim, work.index.has_annoy)}
        return self._loaded[key]


def write_shard(fn: ShardWriter, work: ShardWork, index, indices, sims, started: float,
                recall: tuple[int, int, int] = (0, 0, 0)):
    """Write one shard's neighbour and flat-pair files from its top-k rows and sims.

    Shared by the exact/Annoy stage and the IVF stage so both write the same
    contract. Yields near-duplicate pairs (tagged) and the shard summary,
    which carries the shard's recall-sample figures (``recall``: hits, wanted,
    sampled products).
    """
    start, end = work.start, work.end
    lines = neighbor_lines.NO_LINES  # an empty shard (no rows, maybe no index) writes empty files
    if end > start:
        lines = neighbor_lines.shard_lines(
            index.id_json, index.product_ids, np.arange(start, end, dtype=np.int64), indices,
            sims, fn._top_k, fn._min_similarity, index.exclude_codes, fn._duplicate_threshold,
            full_length=min(fn._top_k, work.index.count - 1))
    fn._queried.inc(lines.rows)
    if lines.near_duplicates:
        # One block per shard: millions of near-duplicate pairs as single elements
        # would cost Beam's per-element overhead each.
        yield beam.pvalue.TaggedOutput(NEAR_DUPLICATES, lines.near_duplicates)
    shard, n_shards = work.shard, work.n_shards
    files.write_bytes(
        files.join(fn._output_dir, NEIGHBORS_DIR, shard_name(NEIGHBORS_PREFIX, shard, n_shards)),
        files.escape_line_breaks(lines.neighbors))
    files.write_bytes(files.join(fn._output_dir, shard_name(FLAT_PREFIX, shard, n_shards)),
                      files.escape_line_breaks(lines.pairs))
    yield {"shard": shard, "rows": lines.rows, "pairs": lines.pair_count,
           "full_lists": lines.full_lists,
           "seconds": round(time.time() - started, 3),
           "search": work.index.search, "nlist": work.index.nlist,
           "nprobe": work.index.nprobe, "recall_hits": recall[0], "recall_wanted": recall[1],
           "recall_sampled": recall[2]}
