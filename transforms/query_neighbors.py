"""Query every product's top-k neighbours, in parallel, and write them.

The id space (sorted product ids) is cut into fixed row ranges; each range is
one output shard, queried by whichever worker gets it, against the index files
memory-mapped once per worker process. Shards are written directly with
deterministic names and contents, so the same input, model and seed give
byte-identical ``neighbors/`` and ``similar_products-*.jsonl`` files, and a
retried range simply rewrites its own shard.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.io.filesystems import FileSystems

from pipeline import files, similarity_search
from pipeline.run_layout import ANNOY_FILE, IDS_FILE, NEIGHBORS_DIR, NEIGHBORS_PREFIX, VECTORS_FILE
from pipeline.run_layout import PAIRS_PREFIX as FLAT_PREFIX
from transforms.errors import METRICS_NAMESPACE


def rows_per_shard(count: int) -> int:
    """Rows per output shard: enough shards to spread work, few enough to stay tidy."""
    return max(1000, min(20_000, math.ceil(count / 16))) if count else 1


def plan_shards(indexes: list[dict]):
    """Split every partition's rows into work items numbered across all partitions.

    Partitions are taken in a fixed order (by value) and each is cut into
    fixed row ranges, so shard names and contents depend only on the data.
    """
    indexes = sorted(indexes, key=lambda d: ("" if d["partition"] is None
                                             else str(d["partition"])))
    total = sum(d["count"] for d in indexes)
    size = rows_per_shard(total)
    items = []
    for index in indexes:
        for start in range(0, index["count"], size):
            items.append(dict(index, start=start, end=min(index["count"], start + size)))
    if not items:  # an empty run still writes one (empty) shard of each output
        items.append(dict(indexes[0] if indexes else {"count": 0}, start=0, end=0))
    for shard, item in enumerate(items):
        yield dict(item, shard=shard, n_shards=len(items))


def shard_name(prefix: str, shard: int, n_shards: int) -> str:
    """Beam-style shard file name, e.g. ``neighbors-00000-of-00004.jsonl``."""
    return f"{prefix}-{shard:05d}-of-{n_shards:05d}.jsonl"


def neighbor_records(product_ids, query_rows, indices, sims, top_k=None, min_similarity=None,
                     exclude_keys=None):
    """The contract's per-product records and origin B's flat pairs, in row order.

    Neighbours below ``min_similarity`` and neighbours sharing the query's
    non-empty exclude key (same parent product, same variant group…) are
    dropped before the list is cut to ``top_k``.
    """
    records, flat = [], []
    for row, idx_row, sim_row in zip(query_rows, indices, sims):
        master = product_ids[row]
        own_key = exclude_keys[row] if exclude_keys is not None else None
        neighbors = []
        for j, s in zip(idx_row, sim_row):
            if j < 0 or j == row:
                continue
            if own_key not in (None, "") and exclude_keys[j] == own_key:
                continue
            similarity = round(float(s), 4)
            if min_similarity is not None and similarity < min_similarity:
                break  # sorted descending: every later one is weaker
            neighbors.append({"product_id": product_ids[j], "similarity": similarity})
            if top_k is not None and len(neighbors) == top_k:
                break
        flat.extend({"similarity": n["similarity"], "master_pi": master,
                     "similar_pi": n["product_id"]} for n in neighbors)
        records.append({"product_id": master, "neighbors": neighbors})
    return records, flat


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
        self.annoy = (similarity_search.open_annoy_index(os.path.join(local, ANNOY_FILE), dim)
                      if has_annoy else None)


NEAR_DUPLICATES = "near_duplicates"


class QueryNeighborsFn(beam.DoFn):
    """One row range → its neighbours shard and flat-pairs shard; yields a summary.

    Pairs at or above ``duplicate_threshold`` also go to the ``near_duplicates``
    output as (product_a, product_b, similarity) with a < b.
    """

    def __init__(self, output_dir: str, top_k: int, min_similarity: float | None = None,
                 duplicate_threshold: float | None = None):
        self._output_dir = output_dir
        self._top_k = top_k
        self._min_similarity = min_similarity
        self._duplicate_threshold = duplicate_threshold
        self._loaded: dict[str, _LoadedIndex] = {}
        self._queried = Metrics.counter(METRICS_NAMESPACE, "neighbors_queried")

    def _index(self, work: dict) -> _LoadedIndex:
        key = work["index_dir"]
        if key not in self._loaded:
            self._loaded = {key: _LoadedIndex(key, work["dim"], work["files"]["annoy"]
                                              is not None and work["search"] == "annoy")}
        return self._loaded[key]

    def process(self, work: dict):
        started = time.time()
        start, end = work["start"], work["end"]
        index = indices = sims = None
        recall = (0, 0, 0)
        if end > start:
            index = self._index(work)
            rows = np.arange(start, end, dtype=np.int64)
            query_k = work.get("query_k", self._top_k)
            if work["search"] == "exact":
                indices, sims = similarity_search.exact_top_k(
                    np.asarray(index.vectors[start:end]), index.vectors, query_k,
                    query_rows=rows)
            else:
                indices, sims = similarity_search.annoy_top_k(
                    index.annoy, index.vectors, rows, query_k,
                    candidates=work["candidates"], search_k=work["search_k"])
                # Annoy is approximate: measure it on the run's recall sample.
                from transforms.ivf_neighbors import recall_hits, recall_rows
                sample = recall_rows(work["count"], work.get("seed", 42))
                sample = sample[(sample >= start) & (sample < end)]
                recall = recall_hits(index.vectors, sample, sims[sample - start],
                                     sims.shape[1]) + (len(sample),)
        yield from write_shard(self, work, index, indices, sims, started, recall)


def write_shard(fn: "QueryNeighborsFn", work: dict, index, indices, sims, started: float,
                recall: tuple[int, int, int] = (0, 0, 0)):
    """Write one shard's neighbour and flat-pair files from its top-k rows and sims.

    Shared by the exact/Annoy stage and the IVF stage so both write the same
    contract. Yields near-duplicate pairs (tagged) and the shard summary,
    which carries the shard's recall-sample figures (``recall``: hits, wanted,
    sampled products).
    """
    start, end = work["start"], work["end"]
    records, flat = [], []
    if end > start:
        rows = np.arange(start, end, dtype=np.int64)
        records, flat = neighbor_records(index.product_ids, rows, indices, sims,
                                         fn._top_k, fn._min_similarity, index.exclude_keys)
        fn._queried.inc(len(records))
        if fn._duplicate_threshold is not None:
            for pair in flat:
                a, b = pair["master_pi"], pair["similar_pi"]
                if pair["similarity"] >= fn._duplicate_threshold and a < b:
                    yield beam.pvalue.TaggedOutput(NEAR_DUPLICATES, (a, b, pair["similarity"]))
    shard, n_shards = work["shard"], work["n_shards"]
    files.write_jsonl(
        files.join(fn._output_dir, NEIGHBORS_DIR, shard_name(NEIGHBORS_PREFIX, shard, n_shards)),
        records)
    files.write_jsonl(
        files.join(fn._output_dir, shard_name(FLAT_PREFIX, shard, n_shards)), flat)
    yield {"shard": shard, "rows": len(records), "pairs": len(flat),
           "full_lists": sum(1 for r in records
                             if len(r["neighbors"]) >= min(fn._top_k, work["count"] - 1)),
           "seconds": round(time.time() - started, 3),
           "search": work.get("search"), "nlist": work.get("nlist"),
           "nprobe": work.get("nprobe"), "recall_hits": recall[0], "recall_wanted": recall[1],
           "recall_sampled": recall[2]}


class QueryNeighbors(beam.PTransform):
    """Index descriptions → neighbour shards written.

    Exact and Annoy indexes are queried shard by shard against the memory-
    mapped index; IVF indexes go through :class:`transforms.ivf_neighbors.IvfNeighbors`
    (lists grouped across workers). Main output: one summary per shard;
    ``near_duplicates``: pairs at or above the duplicate threshold.
    """

    def __init__(self, output_dir: str, top_k: int, min_similarity: float | None = None,
                 duplicate_threshold: float | None = None, nlist: int = 0, nprobe: int = 0,
                 seed: int = 42, recall_target: float = 0.99):
        super().__init__()
        from transforms.ivf_neighbors import IvfNeighbors, TrainIvfFn

        self._fn = QueryNeighborsFn(output_dir, top_k, min_similarity, duplicate_threshold)
        self._train = TrainIvfFn(nlist, nprobe, seed, recall_target)
        self._ivf = IvfNeighbors(output_dir, top_k, min_similarity, duplicate_threshold, seed)

    def expand(self, indexes):
        trained = indexes | "TrainIvf" >> beam.ParDo(self._train)
        work = (indexes.pipeline
                | "Once" >> beam.Impulse()
                | "PlanShards" >> beam.FlatMap(lambda _, every: plan_shards(every),
                                               beam.pvalue.AsList(trained))
                | "SpreadShards" >> beam.Reshuffle())
        by_mode = work | "ByMode" >> beam.Partition(
            lambda w, _n: 1 if w.get("search") == "ivf" else 0, 2)
        direct = by_mode[0] | "Query" >> beam.ParDo(self._fn).with_outputs(
            NEAR_DUPLICATES, main="shards")
        inverted = by_mode[1] | "Ivf" >> self._ivf
        return {
            "shards": (direct.shards, inverted.shards) | "AllShards" >> beam.Flatten(),
            NEAR_DUPLICATES: ((direct[NEAR_DUPLICATES], inverted[NEAR_DUPLICATES])
                              | "AllNearDuplicates" >> beam.Flatten()),
            "indexes": trained,
        }


def clear_stale_shards(output_dir: str) -> None:
    """Remove neighbour shards of an earlier run into the same directory.

    Shards are named by their count, so a re-run with a different catalogue size
    would otherwise leave old shards beside the new ones.
    """
    patterns = [files.join(output_dir, NEIGHBORS_DIR, f"{NEIGHBORS_PREFIX}-*.jsonl"),
                files.join(output_dir, f"{FLAT_PREFIX}-*.jsonl")]
    stale = [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]
    if stale:
        FileSystems.delete(stale)
