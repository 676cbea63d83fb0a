"""Query every product's top-k neighbours, in parallel, and write them.

The id space (sorted product ids) is cut into fixed row ranges; each range is
one output shard, queried by whichever worker gets it, against the index files
memory-mapped once per worker process. Shards are written directly with
deterministic names and contents, so the same input, model and seed give
byte-identical ``neighbors/`` and ``similar_products-*.jsonl`` files, and a
retried range simply rewrites its own shard.
"""

from __future__ import annotations

import math
import time

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import files, similarity_search
from pipeline.index_description import IndexDescription, ShardWork
from pipeline.run_layout import NEIGHBORS_DIR, NEIGHBORS_PREFIX
from pipeline.run_config import SearchConfig
from pipeline.run_layout import PAIRS_PREFIX as FLAT_PREFIX
from transforms.ivf_neighbors import IvfNeighbors, TrainIvfFn
from transforms.neighbor_shards import (
    NEAR_DUPLICATES,
    ShardWriter,
    recall_hits,
    recall_rows,
    write_shard,
)


def rows_per_shard(count: int) -> int:
    """Rows per output shard: enough shards to spread work, few enough to stay tidy."""
    return max(1000, min(20_000, math.ceil(count / 16))) if count else 1


# What an empty run's single (empty) shard describes when no index was described at all.
_NO_INDEX = IndexDescription(index_dir=None, partition=None, count=0, dim=0, model=None)


def plan_shards(indexes: list[IndexDescription]):
    """Split every partition's rows into :class:`ShardWork` items numbered across all
    partitions.

    Partitions are taken in a fixed order (by value) and each is cut into
    fixed row ranges, so shard names and contents depend only on the data.
    """
    indexes = sorted(indexes, key=lambda d: ("" if d.partition is None else str(d.partition)))
    total = sum(d.count for d in indexes)
    size = rows_per_shard(total)
    ranges = []
    for index in indexes:
        for start in range(0, index.count, size):
            ranges.append((index, start, min(index.count, start + size)))
    if not ranges:  # an empty run still writes one (empty) shard of each output
        ranges.append((indexes[0] if indexes else _NO_INDEX, 0, 0))
    for shard, (index, start, end) in enumerate(ranges):
        yield ShardWork(index, start, end, shard, len(ranges))


class QueryNeighborsFn(beam.DoFn):
    """One row range → its neighbours shard and flat-pairs shard; yields a summary.

    Pairs at or above ``duplicate_threshold`` also go to the ``near_duplicates``
    output as (product_a, product_b, similarity) with a < b.
    """

    def __init__(self, run_dir: str, top_k: int, min_similarity: float | None = None,
                 duplicate_threshold: float | None = None):
        self._writer = ShardWriter(run_dir, top_k, min_similarity, duplicate_threshold)

    def process(self, work: ShardWork):
        started = time.time()
        start, end = work.start, work.end
        described = work.index
        index = indices = sims = None
        recall = (0, 0, 0)
        if end > start:
            index = self._writer._index(work)
            rows = np.arange(start, end, dtype=np.int64)
            query_k = (self._writer._top_k if described.query_k is None
                       else described.query_k)
            if described.search == "exact":
                indices, sims = similarity_search.exact_top_k(
                    np.asarray(index.vectors[start:end]), index.vectors, query_k,
                    query_rows=rows)
            else:
                indices, sims = similarity_search.annoy_top_k(
                    index.annoy, index.vectors, rows, query_k,
                    candidates=described.candidates, search_k=described.search_k)
                # Annoy is approximate: measure it on the run's recall sample.
                sample = recall_rows(described.count,
                                     42 if described.seed is None else described.seed)
                sample = sample[(sample >= start) & (sample < end)]
                recall = recall_hits(index.vectors, sample, sims[sample - start],
                                     sims.shape[1]) + (len(sample),)
        yield from write_shard(self._writer, work, index, indices, sims, started, recall)


class QueryNeighbors(beam.PTransform):
    """:class:`IndexDescription` records → neighbour shards written.

    Exact and Annoy indexes are queried shard by shard against the memory-
    mapped index; IVF indexes go through :class:`transforms.ivf_neighbors.IvfNeighbors`
    (lists grouped across workers). Main output: one summary per shard;
    ``near_duplicates``: pairs at or above the duplicate threshold. Shards go to
    ``run_dir``; ``search`` gives top_k, the similarity floor, the duplicate threshold,
    the IVF settings and the seed.
    """

    def __init__(self, run_dir: str, search: SearchConfig):
        super().__init__()
        self._fn = QueryNeighborsFn(run_dir, search.top_k, search.min_similarity,
                                    search.duplicate_threshold)
        self._train = TrainIvfFn(search.nlist, search.nprobe, search.seed, search.recall_target)
        self._ivf = IvfNeighbors(run_dir, search.top_k, search.min_similarity,
                                 search.duplicate_threshold, search.seed)

    def expand(self, indexes):
        trained = indexes | "TrainIvf" >> beam.ParDo(self._train)
        work = (indexes.pipeline
                | "Once" >> beam.Impulse()
                | "PlanShards" >> beam.FlatMap(lambda _, every: plan_shards(every),
                                               beam.pvalue.AsList(trained))
                | "SpreadShards" >> beam.Reshuffle())
        by_mode = work | "ByMode" >> beam.Partition(
            lambda w, _n: 1 if w.index.search == "ivf" else 0, 2)
        direct = by_mode[0] | "Query" >> beam.ParDo(self._fn).with_outputs(
            NEAR_DUPLICATES, main="shards")
        inverted = by_mode[1] | "Ivf" >> self._ivf
        return {
            "shards": (direct.shards, inverted.shards) | "AllShards" >> beam.Flatten(),
            NEAR_DUPLICATES: ((direct[NEAR_DUPLICATES], inverted[NEAR_DUPLICATES])
                              | "AllNearDuplicates" >> beam.Flatten()),
            "indexes": trained,
        }


def clear_stale_shards(run_dir: str) -> None:
    """Remove neighbour shards of an earlier run into the same run directory.

    Shards are named by their count, so a re-run with a different catalogue size
    would otherwise leave old shards beside the new ones.
    """
    patterns = [files.join(run_dir, NEIGHBORS_DIR, f"{NEIGHBORS_PREFIX}-*.jsonl"),
                files.join(run_dir, f"{FLAT_PREFIX}-*.jsonl")]
    stale = [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]
    if stale:
        FileSystems.delete(stale)
