"""Inverted-file (IVF) all-k-nearest-neighbours over L2-normalised vectors.

The exact search of :mod:`pipeline.similarity_search` compares every product
with every other one (N^2 * D). An inverted file first clusters a sample of
the vectors into ``nlist`` centroids (spherical k-means), puts every product
in the list of its nearest centroid, and lets every product query only the
``nprobe`` lists whose centroids are nearest to it. Inside a list the search
is exact cosine, so a neighbour is found exactly when its list is probed; the
candidates of the ``nprobe`` lists are merged into each product's top-k. Cost
per product ~ nprobe * N / nlist * D instead of N * D.

The module is split into the pieces the Beam stage
(:mod:`transforms.ivf_neighbors`) runs on different workers, and
:func:`ivf_all_knn` chains the same pieces in one process (benchmarks and
tests):

* :func:`sample_rows` / :func:`train_centroids` — k-means on a sample;
* :func:`choose_nprobe` — the smallest ``nprobe`` whose measured list coverage
  on the sample reaches the recall target;
* :func:`assign_lists` — each row's ``nprobe`` nearest lists (the first is
  its own list);
* :func:`search_list` — one list: its members against every query probing it;
* :class:`CandidateMerger` — a row range's candidates from all lists → top-k.

Ordering is deterministic: similarity descending, ties by row ascending (rows
are positions in the id-sorted index, so ties go to the smaller product id),
whatever order the lists' pieces arrive in. Pure numpy and faiss, no Beam.
"""

from __future__ import annotations

import math

import numpy as np

# Lists per sqrt(N). Cost per product ~ D * (nlist + nprobe * N / nlist); on
# catalogue-structured vectors (bench/catalog_vectors.py: variants of a model,
# product types, categories) a product's top-20 spreads over many small lists,
# so the nprobe recall@20 >= 0.99 needs grows fast with nlist. Measured at
# 100k x 256 in one run (steal 0-1 %), nprobe chosen for 0.99: 1 sqrt(N) ->
# nlist 316, nprobe 16, 22.2 s, recall 0.998; 2 sqrt(N) -> 632, 24, 24.6 s,
# 0.995; 4 sqrt(N) -> 1265, 48, 40.9 s, 0.998. Hence 1 sqrt(N).
NLIST_PER_SQRT_N = 1.0
# Training points per centroid: faiss warns below 39; 40 keeps the sample
# (and the k-means cost) small while every centroid still has enough points.
TRAIN_POINTS_PER_LIST = 40
# Below this many vectors an inverted file is not worth it; one list = exact.
MIN_IVF_N = 2_000
K_MEANS_ITERATIONS = 10
# The nprobe values tried by choose_nprobe, smallest first.
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128)
# Queries of the sample on which choose_nprobe measures list coverage.
CALIBRATION_QUERIES = 1_000
# Coverage measured on the sample must beat the target by this much: the
# sample's neighbours are farther than the full catalogue's, so coverage on
# the sample is pessimistic; the margin covers sampling noise on top.
CALIBRATION_MARGIN = 0.002
# Similarity entries per block of search_list (float32): bounds the one
# temporary tile a list's search needs to ~64 MiB whatever the list sizes.
LIST_TILE_ENTRIES = 16 * 2**20


def default_nlist(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: ``round(NLIST_PER_SQRT_N * sqrt(n))``, 1 below ``MIN_IVF_N``.

    Never more than ``n // TRAIN_POINTS_PER_LIST`` so each centroid is
    trained on enough points.
    """
    if n < MIN_IVF_N:
        return 1
    return int(max(1, min(round(NLIST_PER_SQRT_N * math.sqrt(n)), n // TRAIN_POINTS_PER_LIST)))


def train_sample_size(n: int, nlist: int) -> int:
    """Rows k-means is trained on: ``TRAIN_POINTS_PER_LIST`` per list, at most ``n``."""
    return int(min(n, max(nlist * TRAIN_POINTS_PER_LIST, min(n, 10_000))))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers of ``range(n)``, sorted, chosen by ``seed`` alone.

    Rows are positions in the id-sorted index, so the same catalogue and seed
    always give the same sample (and the same centroids).
    """
    size = int(min(max(size, 0), n))
    if size == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def train_centroids(sample: np.ndarray, nlist: int, seed: int,
                    iterations: int = K_MEANS_ITERATIONS) -> np.ndarray:
    """Spherical k-means centroids ``[nlist, D]`` (unit norm) of ``sample``, via faiss.

    faiss's k-means (blocked BLAS assignment, centroid sums split by
    centroid across threads) is deterministic for a fixed seed and thread
    count; it measured faster than the same Lloyd iterations in numpy (see
    README). ``nlist`` is clamped to the sample size.
    """
    import faiss  # imported here: only IVF runs need it

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) == 0:
        raise ValueError(f"k-means needs a non-empty 2-D sample, got shape {sample.shape}")
    nlist = int(max(1, min(nlist, len(sample))))
    if nlist == 1:
        mean = sample.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
        return _unit_rows(mean if np.linalg.norm(mean) > 0 else sample[:1])
    kmeans = faiss.Kmeans(sample.shape[1], nlist, niter=int(iterations), seed=int(seed),
                          spherical=True, verbose=False,
                          max_points_per_centroid=max(256, len(sample) // nlist + 1))
    kmeans.train(sample)
    return _unit_rows(np.asarray(kmeans.centroids, dtype=np.float32))


def assign_lists(vectors: np.ndarray, centroids: np.ndarray, nprobe: int,
                 block_rows: int = 4096) -> np.ndarray:
    """Each row's ``nprobe`` nearest centroids ``[n, nprobe]`` int32, nearest first.

    Column 0 is the row's own list. Ties go to the lower list number, so
    the assignment is deterministic.
    """
    n = len(vectors)
    nlist = len(centroids)
    nprobe = int(max(1, min(nprobe, nlist)))
    out = np.empty((n, nprobe), dtype=np.int32)
    centroids_t = np.ascontiguousarray(np.asarray(centroids, dtype=np.float32).T)
    for start in range(0, n, block_rows):
        block = np.asarray(vectors[start:start + block_rows], dtype=np.float32)
        sims = block @ centroids_t
        out[start:start + len(block)] = top_columns(sims, nprobe)
    return out


def top_columns(sims: np.ndarray, kk: int) -> np.ndarray:
    """Column numbers of each row's ``kk`` largest values, by (value desc, column asc)."""
    n_rows, n_cols = sims.shape
    kk = int(min(kk, n_cols))
    if kk == 0:
        return np.empty((n_rows, 0), dtype=np.int64)
    if kk < n_cols:
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        kth = np.take_along_axis(sims, part, axis=1).min(axis=1)
        n_above = (sims > kth[:, None]).sum(axis=1)
        if np.any(n_above + (sims == kth[:, None]).sum(axis=1) > kk):
            # Ties at the k-th value: argpartition may have kept any of them;
            # take the lowest columns among the tied ones instead.
            return _top_columns_with_ties(sims, kth, n_above, kk)
    else:
        part = np.broadcast_to(np.arange(n_cols), sims.shape)
    vals = np.take_along_axis(sims, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _top_columns_with_ties(sims, kth, n_above, kk):
    keep = sims > kth[:, None]
    tied = sims == kth[:, None]
    keep |= tied & (np.cumsum(tied, axis=1) <= (kk - n_above)[:, None])
    r, c = np.nonzero(keep)
    cols = c.reshape(len(sims), kk)
    vals = np.take_along_axis(sims, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1)


def search_list(member_rows: np.ndarray, member_vecs: np.ndarray, query_rows: np.ndarray,
                query_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` members of one list for each query probing it.

    ``member_rows`` must be sorted ascending (then ties among equal
    similarities go to the lower row, as in exact search). A query that is
    itself a member never gets itself. Queries are processed in blocks so the
    similarity tile stays under ``LIST_TILE_ENTRIES`` entries. Returns
    ``(rows int64 [q, kk], sims float32 [q, kk])`` with ``kk = min(k, m)``;
    a query's own slot, when it is a member and ``m <= k``, holds row -1 and
    similarity -inf.
    """
    m, q = len(member_rows), len(query_rows)
    kk = int(min(k, m))
    out_rows = np.empty((q, kk), dtype=np.int64)
    out_sims = np.empty((q, kk), dtype=np.float32)
    if q == 0 or kk == 0:
        return out_rows, out_sims
    members_t = np.ascontiguousarray(np.asarray(member_vecs, dtype=np.float32).T)
    # Where each query sits among the members (if it is one), to mask itself.
    pos = np.searchsorted(member_rows, query_rows)
    pos_c = np.minimum(pos, m - 1)
    is_member = member_rows[pos_c] == query_rows
    step = max(1, LIST_TILE_ENTRIES // max(m, 1))
    for q0 in range(0, q, step):
        q1 = min(q, q0 + step)
        sims = np.asarray(query_vecs[q0:q1], dtype=np.float32) @ members_t
        own = np.flatnonzero(is_member[q0:q1])
        sims[own, pos_c[q0:q1][own]] = -np.inf
        cols = top_columns(sims, kk)
        vals = np.take_along_axis(sims, cols, axis=1)
        rows = member_rows[cols]
        rows[np.isneginf(vals)] = -1
        out_rows[q0:q1] = rows
        out_sims[q0:q1] = vals
    return out_rows, out_sims


class CandidateMerger:
    """Collects the per-list candidates of rows ``[start, end)`` and merges them into top-k.

    Each list a row probes contributes at most ``k`` candidates; a row
    probes at most ``nprobe`` lists, and a product is a member of one list
    only, so no candidate arrives twice. Memory: ``(end - start) * nprobe *
    k * 12`` bytes. The result does not depend on the order pieces arrive in.
    """

    def __init__(self, start: int, end: int, nprobe: int, k: int):
        self.start, self.end, self.k, self.nprobe = int(start), int(end), int(k), int(nprobe)
        n = self.end - self.start
        self._rows = np.full((n, nprobe * k), -1, dtype=np.int64)
        self._sims = np.full((n, nprobe * k), -np.inf, dtype=np.float32)
        self._filled = np.zeros(n, dtype=np.int64)

    def add(self, query_rows: np.ndarray, rows: np.ndarray, sims: np.ndarray) -> None:
        """Add one list's candidates (``search_list``'s output) for some rows of the range."""
        if len(query_rows) == 0 or rows.shape[1] == 0:
            return
        local = np.asarray(query_rows, dtype=np.int64) - self.start
        if local.min() < 0 or local.max() >= self.end - self.start:
            raise ValueError("candidate rows outside this merger's range")
        kk = rows.shape[1]
        offset = self._filled[local]
        if np.any(offset + kk > self._rows.shape[1]):
            raise ValueError("a row received candidates from more than nprobe lists")
        cols = offset[:, None] + np.arange(kk)
        self._rows[local[:, None], cols] = rows
        self._sims[local[:, None], cols] = sims
        self._filled[local] += kk

    def top_k(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row's best ``k`` candidates ``(rows [n, k], sims [n, k])``, ties by row.

        Empty slots (fewer than ``k`` candidates found) hold row -1 and
        similarity -inf at the end of the row.
        """
        k = self.k if k is None else int(k)
        width = min(k, self._rows.shape[1])
        sims = self._sims
        # -inf slots sort last; among them the row -1 comes first, which is fine.
        order = np.lexsort((np.where(self._rows < 0, np.iinfo(np.int64).max, self._rows),
                            -sims), axis=1)[:, :width]
        return (np.take_along_axis(self._rows, order, axis=1),
                np.take_along_axis(sims, order, axis=1))


def list_coverage(sample: np.ndarray, centroids: np.ndarray, k: int,
                  ladder=NPROBE_LADDER, queries: int = CALIBRATION_QUERIES,
                  seed: int = 0) -> dict[int, float]:
    """Share of sample queries' exact top-``k`` (within the sample) whose list each nprobe probes.

    Inside a list the search is exact, so this is the recall IVF would get
    on the sample at each ``nprobe`` of ``ladder``. A sample's neighbours are
    farther apart than the full catalogue's, and farther neighbours fall in
    other lists more often, so it under-estimates the recall on all rows.
    """
    from pipeline import similarity_search

    n = len(sample)
    if n < 2:
        return {p: 1.0 for p in ladder}
    q_rows = sample_rows(n, min(queries, n), seed)
    truth, _ = similarity_search.exact_top_k(sample[q_rows], sample, k, query_rows=q_rows)
    probes_max = int(min(max(ladder), len(centroids)))
    own = assign_lists(sample, centroids, 1)[:, 0]
    probes = assign_lists(sample[q_rows], centroids, probes_max)
    nbr_lists = own[truth]  # [q, k']
    # rank of each neighbour's list among the query's probes (probes_max = not probed)
    match = probes[:, None, :] == nbr_lists[:, :, None]  # [q, k', P]
    rank = np.where(match.any(axis=2), match.argmax(axis=2), probes_max)
    return {p: float((rank < p).mean()) for p in ladder if p <= probes_max} or {
        probes_max: float((rank < probes_max).mean())}


def choose_nprobe(coverage: dict[int, float], target: float) -> int:
    """Smallest ``nprobe`` whose coverage reaches ``target + CALIBRATION_MARGIN`` (else the largest)."""
    for p in sorted(coverage):
        if coverage[p] >= target + CALIBRATION_MARGIN:
            return p
    return max(coverage)


def ivf_all_knn(vectors: np.ndarray, k: int, nlist: int = 0, nprobe: int = 0, seed: int = 42,
                recall_target: float = 0.99) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every row's top-``k`` other rows by cosine via an inverted file, in one process.

    The same steps the Beam stage spreads over workers: train on a sample,
    choose ``nprobe`` (0 = by measured coverage, see :func:`choose_nprobe`),
    assign, search list by list, merge. Returns ``(rows int64 [N, k'],
    sims float32 [N, k'], info)`` ordered like ``exact_top_k`` (``k' = min(k,
    N - 1)``); ``info`` holds nlist, nprobe, the coverage table and timings.
    """
    import time

    n = len(vectors)
    k_out = max(0, min(k, n - 1))
    t0 = time.perf_counter()
    nlist = int(nlist or default_nlist(n))
    train = sample_rows(n, train_sample_size(n, nlist), seed)
    sample = np.asarray(vectors[train], dtype=np.float32)
    centroids = train_centroids(sample, nlist, seed)
    nlist = len(centroids)
    coverage = list_coverage(sample, centroids, k_out, seed=seed) if not nprobe else {}
    nprobe = int(nprobe or choose_nprobe(coverage, recall_target))
    nprobe = min(nprobe, nlist)
    del sample
    t1 = time.perf_counter()
    probes = assign_lists(vectors, centroids, nprobe)
    t2 = time.perf_counter()
    members_of, queries_of = invert(probes, nlist)
    merger = CandidateMerger(0, n, nprobe, k_out)
    for lst in range(nlist):
        members = members_of[lst]
        queries = queries_of[lst]
        if len(members) == 0 or len(queries) == 0:
            continue
        rows, sims = search_list(members, vectors[members], queries, vectors[queries], k_out)
        merger.add(queries, rows, sims)
    out_rows, out_sims = merger.top_k(k_out)
    t3 = time.perf_counter()
    sizes = np.array([len(m) for m in members_of])
    groups = sizes + np.array([len(q) for q in queries_of])
    info = {"nlist": nlist, "nprobe": nprobe, "coverage": coverage,
            "train_seconds": t1 - t0, "assign_seconds": t2 - t1, "search_seconds": t3 - t2,
            "largest_list": int(sizes.max()) if n else 0,
            # members + queries of the biggest GroupByKey group of the Beam stage
            "largest_group": int(groups.max()) if n else 0,
            "sum_sq_list": int((sizes.astype(np.int64) ** 2).sum())}
    return out_rows, out_sims, info


def invert(probes: np.ndarray, nlist: int) -> tuple[list, list]:
    """Per list: its member rows (column 0 of ``probes``) and the rows probing it, both sorted."""
    n, p = probes.shape
    own = probes[:, 0]
    order = np.argsort(own, kind="stable")
    bounds = np.searchsorted(own[order], np.arange(nlist + 1))
    members = [order[bounds[i]:bounds[i + 1]] for i in range(nlist)]
    flat = probes.ravel()
    q_order = np.argsort(flat, kind="stable")  # stable: rows ascending within a list
    q_rows = q_order // p
    q_bounds = np.searchsorted(flat[q_order], np.arange(nlist + 1))
    queries = [q_rows[q_bounds[i]:q_bounds[i + 1]] for i in range(nlist)]
    return members, queries


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
