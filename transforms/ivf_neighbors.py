"""The inverted-file (IVF) neighbour stage, spread over workers by list id.

Steps (each a Beam stage; none holds more than a sample or one list's
members and queries in memory):

1. ``TrainIvf`` — per partition index whose search is ``ivf``: read a seeded
   sample of rows from the memory-mapped ``vectors.npy``, train spherical
   k-means centroids, measure list coverage of 1,000 sampled products'
   exact top-k (exact search over all rows, memory-mapped) and choose
   ``nprobe`` for the recall target (unless ``--nprobe`` is given); save
   ``index/ivf_centroids.npy`` and add ``nlist`` / ``nprobe`` to the
   description.
2. ``AssignFn`` — per output shard (a fixed row range): each row's
   ``nprobe`` nearest centroids. Emits, keyed by ``(index_dir, list)``, the
   row numbers of the shard's members of that list and of its rows probing
   it (row numbers only: vectors are read back from ``vectors.npy``).
3. ``GroupByKey`` on the list, then ``SearchListFn``: reads the list's
   members and queries from the memory-mapped ``vectors.npy``, exact cosine
   of every query probing the list against its members in one tiled call,
   and emits each query piece's top-k candidates keyed by its shard.
4. ``GroupByKey`` on the shard, then ``MergeWriteFn``: merge the candidates
   of the shard's rows (ties by row), write the shard's ``neighbors/`` and
   flat-pair files exactly like the exact stage, and measure recall on the
   shard's rows of the run's recall sample (exact search against the
   memory-mapped vectors).

Peak memory of one worker (bytes, f = 4): step 3 holds one list's members
and queries, ``(1 + nprobe) * (N / nlist) * D * f`` for average lists (the
largest list sets the peak), plus one similarity tile of at most
``ivf.LIST_TILE_ENTRIES * f`` and its selection temporaries; step 4 holds one
shard's candidates, ``rows_per_shard * nprobe * query_k * 12``; step 1 the
sample, ``40 * nlist * D * f``. Bytes shuffled: ``(1 + nprobe) * N * 8``
(row numbers) into step 3 and ``N * nprobe * query_k * 12`` into step 4;
each worker reads ``vectors.npy`` (``N * D * f``, copied once to its local disk
from an object store) by pages, never into memory as a whole.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

import apache_beam as beam
import numpy as np

from pipeline import files, ivf, similarity_search
from pipeline.run_layout import CENTROIDS_FILE, IDS_FILE, VECTORS_FILE
from transforms.neighbor_shards import (
    NEAR_DUPLICATES,
    ShardWriter,
    recall_hits,
    recall_rows,
    write_shard,
)


def _local_dir(index_dir: str) -> str:
    """The index directory on this worker's disk (copied once from an object store)."""
    if files.is_local(index_dir):
        return index_dir
    cache = os.path.join(tempfile.gettempdir(), "similarity-index-" + hashlib.sha1(
        index_dir.encode()).hexdigest()[:16])
    for name in (VECTORS_FILE, IDS_FILE, CENTROIDS_FILE):
        if name != CENTROIDS_FILE or files.exists(files.join(index_dir, name)):
            files.copy_to_local(files.join(index_dir, name), cache)
    return cache


class TrainIvfFn(beam.DoFn):
    """One index description → the same with ``nlist``, ``nprobe`` and centroids (IVF only)."""

    def __init__(self, nlist: int, nprobe: int, seed: int, recall_target: float):
        self._nlist, self._nprobe = nlist, nprobe
        self._seed, self._target = seed, recall_target

    def process(self, part: dict):
        if part.get("search") != "ivf" or part["count"] == 0:
            yield part
            return
        started = time.time()
        vectors = similarity_search.load_vectors(
            os.path.join(_local_dir(part["index_dir"]), VECTORS_FILE), mmap=True)
        n = part["count"]
        nlist = int(self._nlist or ivf.default_nlist(n))
        sample = np.asarray(vectors[ivf.sample_rows(n, ivf.train_sample_size(n, nlist),
                                                    self._seed)])
        centroids = ivf.train_centroids(sample, nlist, self._seed)
        coverage = {}
        nprobe = self._nprobe
        if not nprobe:
            coverage = ivf.list_coverage(vectors, centroids, min(part["query_k"], n - 1),
                                         seed=self._seed)
            nprobe = ivf.choose_nprobe(coverage, self._target)
        del sample
        path = files.join(part["index_dir"], CENTROIDS_FILE)
        with files.staged_output(path) as staged:
            np.save(staged, centroids, allow_pickle=False)
        yield dict(part, nlist=int(len(centroids)), nprobe=int(min(nprobe, len(centroids))),
                   ivf_coverage={str(p): round(c, 4) for p, c in coverage.items()},
                   ivf_centroids=CENTROIDS_FILE,
                   ivf_train_seconds=round(time.time() - started, 3))


class AssignFn(beam.DoFn):
    """One shard (row range) → per list: its members there and its rows probing the list."""

    def __init__(self):
        self._cache: dict = {}

    def _load(self, index_dir):
        if index_dir not in self._cache:
            local = _local_dir(index_dir)
            self._cache = {index_dir: (
                similarity_search.load_vectors(os.path.join(local, VECTORS_FILE), mmap=True),
                np.load(os.path.join(local, CENTROIDS_FILE), allow_pickle=False))}
        return self._cache[index_dir]

    def process(self, work: dict):
        start, end = work["start"], work["end"]
        if end <= start:
            return
        vectors, centroids = self._load(work["index_dir"])
        probes = ivf.assign_lists(vectors[start:end], centroids, work["nprobe"])
        members, queries = ivf.invert(probes, len(centroids))
        # Row numbers only: the list's worker reads the vectors from the memory-mapped
        # index, so the shuffle carries 8 bytes per (row, list) instead of D floats.
        piece = _piece_work(work)
        for lst in range(len(centroids)):
            m, q = members[lst], queries[lst]
            if len(m):
                yield (work["index_dir"], lst), ("m", (m + start).astype(np.int64), None)
            if len(q):
                yield (work["index_dir"], lst), ("q", (q + start).astype(np.int64), piece)


class SearchListFn(beam.DoFn):
    """One list's member and query rows → each query piece's top-k candidates, keyed by shard.

    All queries probing the list are searched in one call (tiled inside
    :func:`ivf.search_list`), whatever shard they come from, then split back
    into the shards' pieces; vectors come from the memory-mapped index.
    """

    def __init__(self):
        self._cache: dict = {}

    def _vectors(self, index_dir):
        if index_dir not in self._cache:
            self._cache = {index_dir: similarity_search.load_vectors(
                os.path.join(_local_dir(index_dir), VECTORS_FILE), mmap=True)}
        return self._cache[index_dir]

    def process(self, element):
        (index_dir, _), pieces = element
        members, queries = [], []
        for kind, rows, work in pieces:
            (members if kind == "m" else queries).append((rows, work))
        if not members or not queries:
            return
        rows = np.sort(np.concatenate([r for r, _ in members]))  # arrival order must not matter
        queries.sort(key=lambda piece: piece[1]["shard"])
        q_rows = np.concatenate([r for r, _ in queries])
        vectors = self._vectors(index_dir)
        found, sims = ivf.search_list(rows, vectors[rows], q_rows, vectors[q_rows],
                                      queries[0][1]["query_k"])
        at = 0
        for piece_rows, work in queries:
            end = at + len(piece_rows)
            yield work["shard"], (work, piece_rows, found[at:end], sims[at:end])
            at = end


def _piece_work(work: dict) -> dict:
    """The keys of a shard's work item that the list search and the merge need."""
    keep = ("index_dir", "partition", "count", "dim", "search", "query_k", "nprobe", "nlist",
            "start", "end", "shard", "n_shards", "files", "model")
    return {key: work[key] for key in keep if key in work}


class MergeWriteFn(beam.DoFn):
    """One shard's candidates → its neighbour files; yields the shard summary (and near-dups)."""

    def __init__(self, output_dir: str, top_k: int, min_similarity, duplicate_threshold,
                 seed: int):
        self._writer = ShardWriter(output_dir, top_k, min_similarity, duplicate_threshold)
        self._seed = seed

    def process(self, element):
        _, pieces = element
        pieces = list(pieces)
        started = time.time()
        work = pieces[0][0]
        merger = ivf.CandidateMerger(work["start"], work["end"], work["nprobe"],
                                     work["query_k"])
        for _, q_rows, found, sims in pieces:
            merger.add(q_rows, found, sims)
        k_out = min(work["query_k"], work["count"] - 1)
        indices, sims = merger.top_k(k_out)
        index = self._writer._index(dict(work, files={"annoy": None}))
        sample = recall_rows(work["count"], self._seed)
        sample = sample[(sample >= work["start"]) & (sample < work["end"])]
        hits, wanted = recall_hits(index.vectors, sample, sims[sample - work["start"]], k_out)
        yield from write_shard(self._writer, work, index, indices, sims, started,
                               recall=(hits, wanted, len(sample)))


class IvfNeighbors(beam.PTransform):
    """Shard work items of IVF indexes (after ``TrainIvfFn``) → shard summaries, near-dups."""

    def __init__(self, output_dir: str, top_k: int, min_similarity, duplicate_threshold,
                 seed: int):
        super().__init__()
        self._merge = MergeWriteFn(output_dir, top_k, min_similarity, duplicate_threshold, seed)

    def expand(self, work):
        return (work
                | "Assign" >> beam.ParDo(AssignFn())
                | "GroupByList" >> beam.GroupByKey()
                | "SearchLists" >> beam.ParDo(SearchListFn())
                | "GroupByShard" >> beam.GroupByKey()
                | "MergeWrite" >> beam.ParDo(self._merge).with_outputs(NEAR_DUPLICATES,
                                                                       main="shards"))
