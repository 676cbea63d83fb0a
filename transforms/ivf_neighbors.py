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
   row numbers of the shard's members of that list (row numbers only: vectors
   are read back from ``vectors.npy``), and the shard's probes keyed by shard.
3. Round 1, ``GroupByKey`` on the list, then ``OwnListFn``: each member's
   exact top-k among its own list's members. The candidates go to the merge;
   each row's k-th similarity (its *floor*) goes back to its shard.
4. ``GroupByKey`` on the shard, then ``RouteQueriesFn``: the shard's rows,
   with their floors, keyed by each of the other ``nprobe - 1`` lists they
   probe.
5. Round 2, ``GroupByKey`` on the list (members and probing rows), then
   ``FarListFn``: exact cosine of the probing rows against the members, in
   tiles, keeping only entries at or above a row's floor (at most k per
   row). An entry below the floor can never enter the row's top-k, so the
   result is the same as keeping every list's top-k, but nearly all entries
   are dropped by one comparison and few candidates are shuffled on (the
   share kept: bench/MEASUREMENTS.md, "IVF lists and probe passes").
6. ``GroupByKey`` on the shard, then ``MergeWriteFn``: merge the candidates
   of the shard's rows (ties by row), write the shard's ``neighbors/`` and
   flat-pair files exactly like the exact stage, and measure recall on the
   shard's rows of the run's recall sample (exact search against the
   memory-mapped vectors).

Peak memory of one worker (bytes, f = 4): step 5 holds one list's members
and the rows probing it, ``nprobe * (N / nlist) * D * f`` for average lists
(the largest list sets the peak), plus one similarity tile of at most
``ivf.LIST_TILE_ENTRIES * f`` and the running top-k of the probing rows
(``nprobe * N / nlist * query_k * 8``); step 3 one list and its members'
top-k; step 6 one shard's candidates, about ``rows_per_shard * 2 * query_k
* 12``; step 1 the sample, ``40 * nlist * D * f``. Bytes shuffled: ``N * 8``
(member rows) into steps 3 and 5, ``N * nprobe * 4`` (probes) plus ``N *
12`` (floors) into step 4, ``N * (nprobe - 1) * 12`` into step 5, and ``N
* query_k * 8`` plus the round-2 survivors into step 6 (instead of ``N *
nprobe * query_k * 12`` when every list sent its top-k). Each worker reads
``vectors.npy`` (``N * D * f``, copied once to its local disk from an object
store) by pages, never into memory as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from typing import Any, Tuple

import apache_beam as beam
import numpy as np

from pipeline import files, ivf, similarity_search
from pipeline.index_description import IndexDescription, ShardWork
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
    """One :class:`IndexDescription` → a new one with ``nlist``, ``nprobe`` and centroids (IVF
    only)."""

    def __init__(self, nlist: int, nprobe: int, seed: int, recall_target: float):
        self._nlist, self._nprobe = nlist, nprobe
        self._seed, self._target = seed, recall_target

    def process(self, part: IndexDescription):
        if part.search != "ivf" or part.count == 0:
            yield part
            return
        started = time.time()
        vectors = similarity_search.load_vectors(
            os.path.join(_local_dir(part.index_dir), VECTORS_FILE), mmap=True)
        n = part.count
        nlist = int(self._nlist or ivf.default_nlist(n))
        sample = np.asarray(vectors[ivf.sample_rows(n, ivf.train_sample_size(n, nlist),
                                                    self._seed)])
        centroids = ivf.train_centroids(sample, nlist, self._seed)
        coverage = {}
        nprobe = self._nprobe
        if not nprobe:
            coverage = ivf.list_coverage(vectors, centroids, min(part.query_k, n - 1),
                                         seed=self._seed)
            nprobe = ivf.choose_nprobe(coverage, self._target)
        del sample
        path = files.join(part.index_dir, CENTROIDS_FILE)
        with files.staged_output(path) as staged:
            np.save(staged, centroids, allow_pickle=False)
        yield dataclasses.replace(
            part, nlist=int(len(centroids)), nprobe=int(min(nprobe, len(centroids))),
            ivf_coverage={str(p): round(c, 4) for p, c in coverage.items()},
            ivf_centroids=CENTROIDS_FILE, ivf_train_seconds=round(time.time() - started, 3))


# Tags of the stage's side outputs.
PROBES = "probes"
FLOORS = "floors"


class _IndexFiles:
    """The memory-mapped vectors (and centroids) of the last index a worker used."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, index_dir: str, centroids: bool = False):
        key = (index_dir, centroids)
        if key not in self._cache:
            local = _local_dir(index_dir)
            vectors = similarity_search.load_vectors(os.path.join(local, VECTORS_FILE),
                                                     mmap=True)
            self._cache = {key: (vectors, np.load(os.path.join(local, CENTROIDS_FILE),
                                                  allow_pickle=False) if centroids else None)}
        return self._cache[key]


def _k_out(piece: ShardWork) -> int:
    """Neighbours kept per row: ``query_k``, or every other row of a smaller partition."""
    return int(max(0, min(piece.index.query_k, piece.index.count - 1)))


class AssignFn(beam.DoFn):
    """One shard (row range) → its members of each list, and its rows' probes.

    Main output, keyed by ``(index_dir, list)``: the shard's member rows of
    that list (row numbers only: a list's worker reads the vectors from the
    memory-mapped index, so the shuffle carries 8 bytes per row, not D
    floats). ``probes`` output, keyed by shard: each row's ``nprobe``
    nearest lists, nearest (its own) first.
    """

    def __init__(self):
        self._files = _IndexFiles()

    def process(self, work: ShardWork):
        start, end = work.start, work.end
        if end <= start:
            return
        vectors, centroids = self._files.get(work.index.index_dir, centroids=True)
        probes = ivf.assign_lists(vectors[start:end], centroids, work.index.nprobe)
        piece = _piece_work(work)
        for lst, rows in enumerate(ivf.rows_by_list(probes[:, 0], len(centroids))):
            if len(rows):
                yield (work.index.index_dir, lst), ("m", (rows + start).astype(np.int64), piece)
        yield beam.pvalue.TaggedOutput(PROBES, (work.shard, ("probes", piece, probes)))


class OwnListFn(beam.DoFn):
    """Round 1, one list's members → each member's top-k within its own list.

    Main output, keyed by shard: ``("own", rows, keys [r, k])`` candidates
    for the merge; ``floors`` output, keyed by shard: each row's k-th best
    similarity so far, which its searches of the other lists start from.
    """

    def __init__(self):
        self._files = _IndexFiles()

    def process(self, element):
        (index_dir, _), pieces = element
        # arrival order must not matter
        pieces = sorted(pieces, key=lambda piece: piece[2].shard)
        if not pieces:
            return
        rows = np.concatenate([r for _, r, _ in pieces])
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        vectors, _ = self._files.get(index_dir)
        keys = ivf.own_list_top_k(rows, np.asarray(vectors[rows], dtype=np.float32),
                                  _k_out(pieces[0][2]))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))  # piece order → sorted position
        floor = (ivf.key_sims(keys[:, -1]) if keys.shape[1]
                 else np.full(len(rows), np.inf, dtype=np.float32))
        at = 0
        for _, piece_rows, piece in pieces:
            where = back[at:at + len(piece_rows)]
            at += len(piece_rows)
            yield piece.shard, ("own", piece, rows[where], keys[where])
            yield beam.pvalue.TaggedOutput(FLOORS, (piece.shard,
                                                    ("floor", rows[where], floor[where])))


class RouteQueriesFn(beam.DoFn):
    """One shard's probes and floors → per other list it probes: those rows and their floors."""

    def process(self, element):
        _, items = element
        probes = piece = None
        floor_rows, floors = [], []
        for item in items:
            if item[0] == "probes":
                _, piece, probes = item
            else:
                floor_rows.append(item[1])
                floors.append(item[2])
        if piece is None or probes.shape[1] < 2:
            return
        start = piece.start
        floor = np.full(piece.end - start, -np.inf, dtype=np.float32)
        if floor_rows:
            floor[np.concatenate(floor_rows) - start] = np.concatenate(floors)
        for lst, local in enumerate(ivf.rows_by_list(probes[:, 1:], piece.index.nlist)):
            if len(local):
                yield ((piece.index.index_dir, lst),
                       ("q", (local + start).astype(np.int64), floor[local], piece))


class FarListFn(beam.DoFn):
    """Round 2, one list's members and the rows of other lists probing it → their candidates.

    Only entries at or above a query's floor are kept, at most k per query;
    emitted keyed by the query's shard as ``("far", rows, keys)`` pairs.
    """

    def __init__(self):
        self._files = _IndexFiles()

    def process(self, element):
        (index_dir, _), pieces = element
        members, queries = [], []
        for piece in pieces:
            (members if piece[0] == "m" else queries).append(piece)
        if not members or not queries:
            return
        rows = np.sort(np.concatenate([p[1] for p in members]))  # arrival order must not matter
        queries.sort(key=lambda p: p[3].shard)
        q_rows = np.concatenate([p[1] for p in queries])
        floor = np.concatenate([p[2] for p in queries])
        vectors, _ = self._files.get(index_dir)
        keys = ivf.far_list_top_k(rows, np.asarray(vectors[rows], dtype=np.float32),
                                  np.asarray(vectors[q_rows], dtype=np.float32), floor,
                                  _k_out(queries[0][3]))
        at = 0
        for _, piece_rows, _, piece in queries:
            piece_keys = keys[at:at + len(piece_rows)]
            at += len(piece_rows)
            found = piece_keys != ivf.EMPTY_KEY
            if found.any():
                yield piece.shard, ("far", None, np.repeat(piece_rows, found.sum(axis=1)),
                                       piece_keys[found])


def _piece_work(work: ShardWork) -> ShardWork:
    """The shard's work item as the list searches and the merge get it: without the IVF
    coverage figures, the one field of any size that they never read."""
    return dataclasses.replace(work, index=dataclasses.replace(work.index, ivf_coverage=None))


class MergeWriteFn(beam.DoFn):
    """One shard's candidates → its neighbour files; yields the shard summary (and near-dups)."""

    def __init__(self, output_dir: str, top_k: int, min_similarity, duplicate_threshold,
                 seed: int):
        self._writer = ShardWriter(output_dir, top_k, min_similarity, duplicate_threshold)
        self._seed = seed

    def process(self, element):
        _, items = element
        started = time.time()
        work = None
        local, keys = [], []
        for kind, piece, rows, piece_keys in items:
            if kind == "own":
                work = piece
                found = piece_keys != ivf.EMPTY_KEY
                rows, piece_keys = np.repeat(rows, found.sum(axis=1)), piece_keys[found]
            local.append(rows)
            keys.append(piece_keys)
        if work is None:
            raise ValueError("a shard received list candidates but none of its own rows")
        k_out = _k_out(work)
        top = ivf.merge_keys(np.concatenate(local) - work.start, np.concatenate(keys),
                             work.end - work.start, k_out)
        indices, sims = ivf.key_rows(top), ivf.key_sims(top)
        index = self._writer._index(work)  # an IVF index: no Annoy forest is opened
        sample = recall_rows(work.index.count, self._seed)
        sample = sample[(sample >= work.start) & (sample < work.end)]
        hits, wanted = recall_hits(index.vectors, sample, sims[sample - work.start], k_out)
        yield from write_shard(self._writer, work, index, indices, sims, started,
                               recall=(hits, wanted, len(sample)))


class IvfNeighbors(beam.PTransform):
    """Shard work items of IVF indexes (after ``TrainIvfFn``) → shard summaries, near-dups."""

    def __init__(self, output_dir: str, top_k: int, min_similarity, duplicate_threshold,
                 seed: int):
        super().__init__()
        self._merge = MergeWriteFn(output_dir, top_k, min_similarity, duplicate_threshold, seed)

    def expand(self, work):
        keyed = Tuple[Any, Any]  # the DoFns' mixed yields defeat Beam's type inference
        assigned = work | "Assign" >> beam.ParDo(AssignFn()).with_output_types(
            keyed).with_outputs(PROBES, main="members")
        own = (assigned.members
               | "GroupOwnLists" >> beam.GroupByKey()
               | "SearchOwnLists" >> beam.ParDo(OwnListFn()).with_output_types(keyed).with_outputs(
                   FLOORS, main="own"))
        queries = ((assigned[PROBES], own[FLOORS])
                   | "ProbesAndFloors" >> beam.Flatten()
                   | "GroupByShardToRoute" >> beam.GroupByKey()
                   | "RouteQueries" >> beam.ParDo(RouteQueriesFn()).with_output_types(keyed))
        far = ((assigned.members, queries)
               | "MembersAndQueries" >> beam.Flatten()
               | "GroupFarLists" >> beam.GroupByKey()
               | "SearchFarLists" >> beam.ParDo(FarListFn()).with_output_types(keyed))
        return ((own.own, far)
                | "AllCandidates" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "MergeWrite" >> beam.ParDo(self._merge).with_outputs(NEAR_DUPLICATES,
                                                                       main="shards"))
