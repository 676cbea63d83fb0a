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
* :func:`own_list_top_k` — round 1, one list: each member's top-k among its
  list, whose k-th similarity becomes the member's floor;
* :func:`far_list_top_k` — round 2, one list: the rows probing it from other
  lists, keeping only entries at or above each one's floor;
* :func:`merge_keys` — a row range's candidates from all lists → top-k.

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
# so the nprobe recall@20 >= 0.99 needs grows fast with nlist: with nprobe chosen
# for that target, 1 sqrt(N) ran fastest of 1, 2 and 4 sqrt(N)
# (bench/MEASUREMENTS.md, "IVF lists and probe passes").
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
# Coverage measured on the CALIBRATION_QUERIES sampled products (truth: exact
# search over all rows, so unbiased) must beat the target by this much, to
# cover the sampling noise of 1,000 queries' 20,000 neighbours.
CALIBRATION_MARGIN = 0.004
# Similarity entries per block of RunningTopK.search (float32): bounds the one
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


def order_keys(sims: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One uint64 per (similarity, row) that sorts ascending as (similarity desc, row asc).

    The high 32 bits are the float32 similarity's bits mapped to an order-
    reversing unsigned integer, the low 32 bits the row; so one ``np.sort`` /
    ``np.partition`` of plain integers gives the deterministic order (ties to
    the lower row) that a two-key ``lexsort`` would, in one pass and one
    temporary. -0.0 is folded into +0.0 first, as numpy compares them equal.
    Rows must be in ``[0, 2**32 - 1)``; ``EMPTY_KEY`` (row 2**32 - 1, -inf) sorts last.
    """
    bits = (np.asarray(sims, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    ordered = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return ((~ordered).astype(np.uint64) << np.uint64(32)) | np.asarray(rows).astype(np.uint64)


def key_rows(keys: np.ndarray) -> np.ndarray:
    """The rows (int64) of :func:`order_keys` keys; the empty key gives -1."""
    rows = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    rows[rows == 0xFFFFFFFF] = -1
    return rows


def key_sims(keys: np.ndarray) -> np.ndarray:
    """The similarities (float32) of :func:`order_keys` keys."""
    ordered = ~((keys >> np.uint64(32)).astype(np.uint32))
    bits = np.where(ordered & np.uint32(0x80000000), ordered & np.uint32(0x7FFFFFFF), ~ordered)
    return bits.astype(np.uint32).view(np.float32)


EMPTY_KEY = int(order_keys(np.array([-np.inf], np.float32), np.array([0xFFFFFFFF]))[0])


def _top_keys(keys: np.ndarray, kk: int) -> np.ndarray:
    """Each row's ``kk`` smallest keys, sorted ascending (keys are unique per row)."""
    if kk < keys.shape[1]:
        keys = np.partition(keys, kk - 1, axis=1)[:, :kk]
    return np.sort(keys, axis=1)


def top_columns(sims: np.ndarray, kk: int) -> np.ndarray:
    """Column numbers of each row's ``kk`` largest values, by (value desc, column asc).

    Selection by value first (``np.partition`` of the floats gives each row's
    kk-th value, one pass), then only the entries at or above it (kk per row
    plus ties) are ordered by :func:`order_keys`. This touches every entry
    once instead of the argpartition + lexsort of all kk columns it replaced.
    """
    n_rows, n_cols = sims.shape
    kk = int(min(kk, n_cols))
    if kk == 0 or n_rows == 0:
        return np.empty((n_rows, kk), dtype=np.int64)
    if kk < n_cols:
        kth = -np.partition(-sims, kk - 1, axis=1)[:, kk - 1]
        return _rows_at_or_above(sims, kth, kk, np.arange(n_cols))
    return key_rows(np.sort(order_keys(sims, np.broadcast_to(np.arange(n_cols), sims.shape)),
                            axis=1))


def _rows_at_or_above(sims, threshold, kk, col_rows):
    """``col_rows`` of each row's best ``kk`` entries among those ``>= threshold`` (>= kk each)."""
    flat = np.flatnonzero(sims >= threshold[:, None])
    r, c = np.divmod(flat, sims.shape[1])
    keys = _pad_by_row(r, order_keys(sims.ravel()[flat], col_rows[c]), len(sims))
    return key_rows(_top_keys(keys, kk))


def _pad_by_row(r: np.ndarray, keys: np.ndarray, n_rows: int, width: int = 0) -> np.ndarray:
    """Keys grouped by their row number ``r`` (sorted) → a ``[n_rows, max(count, width)]``
    matrix padded with ``EMPTY_KEY``."""
    counts = np.bincount(r, minlength=n_rows)
    width = int(max(width, counts.max() if len(counts) else 0))
    out = np.full((n_rows, width), EMPTY_KEY, dtype=np.uint64)
    starts = np.cumsum(counts) - counts
    out[r, np.arange(len(r)) - starts[r]] = keys
    return out


def merge_keys(local_rows: np.ndarray, keys: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Candidates as (row, :func:`order_keys` key) pairs → each row's best ``k`` keys ``[n_rows, k]``.

    ``local_rows`` (int, ``0 <= r < n_rows``) says which row each key is a
    candidate for; pairs may come in any order and from any number of lists
    (a product is a member of one list only, so no key arrives twice for a
    row). Rows with fewer than ``k`` candidates are padded with ``EMPTY_KEY``
    at the end. The result does not depend on the order of the pairs.
    """
    local_rows = np.asarray(local_rows, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    if len(local_rows) and (local_rows.min() < 0 or local_rows.max() >= n_rows):
        raise ValueError("candidate rows outside the merged range")
    by_row = np.argsort(local_rows, kind="stable")
    padded = _pad_by_row(local_rows[by_row], keys[by_row], n_rows, width=k)
    return _top_keys(padded, k) if k else padded[:, :0]


def own_list_top_k(member_rows: np.ndarray, member_vecs: np.ndarray,
                   k: int) -> np.ndarray:
    """Round 1 of the two-round search: each member's best ``k`` other members (keys ``[m, k]``).

    ``member_rows`` are the list's rows, ascending. A row's ``k``-th best
    here (``key_sims(keys[:, -1])``, -inf when the list has ``<= k``
    members) is the floor its searches of the other probed lists start from.
    """
    best = RunningTopK(len(member_rows), k)
    best.search(np.arange(len(member_rows)), member_vecs, np.asarray(member_rows, np.int64),
                member_vecs, self_block=True)
    return best.keys


def far_list_top_k(member_rows: np.ndarray, member_vecs: np.ndarray, query_vecs: np.ndarray,
                   floor: np.ndarray, k: int) -> np.ndarray:
    """Round 2: one list's best ``k`` members at or above each query's ``floor`` (keys ``[q, k]``).

    The queries are rows probing this list that are not its members. Only
    entries at or above the floor (the query's own-list ``k``-th best) can
    enter its final top-``k``, so almost all are dropped by one comparison;
    slots left over hold ``EMPTY_KEY``.
    """
    best = RunningTopK(len(query_vecs), k, floor=floor)
    best.search(np.arange(len(query_vecs)), query_vecs, np.asarray(member_rows, np.int64),
                member_vecs)
    return best.keys


def list_coverage(vectors: np.ndarray, centroids: np.ndarray, k: int,
                  ladder=NPROBE_LADDER, queries: int = CALIBRATION_QUERIES,
                  seed: int = 0) -> dict[int, float]:
    """Share of sampled queries' exact top-``k`` among ``vectors`` whose list each nprobe probes.

    Inside a list the search is exact, so this is the recall IVF gets at
    each ``nprobe`` of ``ladder``, measured on ``queries`` seeded rows. Pass
    *all* the index's vectors (memory-mapped is fine: one exact search of
    ``queries`` rows, ``queries * N * D`` multiply-adds): truth within the
    k-means sample alone is far too pessimistic at scale, as a sample's
    neighbours are farther apart and spread over more lists, so it asks
    for a larger ``nprobe`` than the recall target needs (bench/MEASUREMENTS.md,
    "IVF lists and probe passes").
    Only the queries and their neighbours are assigned to lists.
    """
    from pipeline import similarity_search

    n = len(vectors)
    if n < 2:
        return {p: 1.0 for p in ladder}
    q_rows = sample_rows(n, min(queries, n), seed)
    truth, _ = similarity_search.exact_top_k(np.asarray(vectors[q_rows]), vectors, k,
                                             query_rows=q_rows)
    probes_max = int(min(max(ladder), len(centroids)))
    needed, inverse = np.unique(truth, return_inverse=True)
    nbr_lists = assign_lists(np.asarray(vectors[needed]), centroids, 1)[:, 0][
        inverse.reshape(truth.shape)]  # [q, k']
    probes = assign_lists(np.asarray(vectors[q_rows]), centroids, probes_max)
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


class RunningTopK:
    """Every row's best ``k`` candidates so far, and the similarity a new one must reach.

    Candidates are held as :func:`order_keys` keys ``[n, k]`` (sorted, best
    first; 8 bytes each) with ``threshold`` = each row's k-th similarity
    (-inf until it has ``k``). :meth:`search` compares a block of queries
    with a block of members and keeps only the entries at or above the
    query's threshold, so once a row's own list has set a k-th best, the
    selection work of every later list is a compare and a few survivors,
    not a partial sort of every similarity. Exact: an entry below the
    current k-th can never enter the top-k. The result does not depend on
    the order blocks arrive in (keys are unique and totally ordered).
    """

    def __init__(self, n: int, k: int, floor: np.ndarray | None = None):
        self.k = int(k)
        self.keys = np.full((n, self.k), EMPTY_KEY, dtype=np.uint64)
        # floor: a similarity each row's k-th best is already known to reach (the
        # k-th best of its own list, found in an earlier round); entries below it
        # can never enter the final top-k, so they are dropped from the start.
        self.floor = (np.full(n, -np.inf, dtype=np.float32) if floor is None
                      else np.asarray(floor, dtype=np.float32).copy())
        self.threshold = self.floor.copy()
        self.survivors = 0  # entries that passed the threshold (profiling)
        self.entries = 0  # similarities computed

    def search(self, query_rows: np.ndarray, query_vecs: np.ndarray, member_rows: np.ndarray,
               member_vecs: np.ndarray, self_block: bool = False) -> None:
        """Offer every (query, member) pair's similarity; tiles bound the temporaries.

        ``self_block``: queries are the members themselves, in the same
        order (a list searched against itself), and a row never gets itself.
        """
        m, q = len(member_rows), len(query_rows)
        if m == 0 or q == 0 or self.k == 0:
            return
        member_vecs = np.asarray(member_vecs, dtype=np.float32)
        step = max(1, LIST_TILE_ENTRIES // m)
        for q0 in range(0, q, step):
            q1 = min(q, q0 + step)
            sims = np.asarray(query_vecs[q0:q1], dtype=np.float32) @ member_vecs.T
            if self_block:
                local = np.arange(q1 - q0)
                sims[local, q0 + local] = -np.inf
            self._offer(query_rows[q0:q1], sims, member_rows)

    def _offer(self, rows: np.ndarray, sims: np.ndarray, member_rows: np.ndarray) -> None:
        self.entries += sims.size
        thr = self.threshold[rows]
        open_rows = np.flatnonzero(np.isneginf(thr))
        if len(open_rows) and sims.shape[1] > self.k:
            # No k-th best yet (first block of these rows): the tile's own k-th.
            thr = thr.copy()
            part = np.partition(-sims[open_rows], self.k - 1, axis=1)[:, self.k - 1]
            thr[open_rows] = -part
        flat = np.flatnonzero(sims >= thr[:, None])
        if len(flat) == 0:
            return
        self.survivors += len(flat)
        r, c = np.divmod(flat, sims.shape[1])
        keys = order_keys(sims.ravel()[flat], member_rows[c])
        hit = np.flatnonzero(np.bincount(r, minlength=len(rows)))
        local = np.searchsorted(hit, r)
        cand = _pad_by_row(local, keys, len(hit))
        target = rows[hit]
        merged = _top_keys(np.concatenate([self.keys[target], cand], axis=1), self.k)
        self.keys[target] = merged
        self.threshold[target] = np.maximum(key_sims(merged[:, -1]), self.floor[target])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows int64 [n, k], sims float32 [n, k])``, best first; empty slots -1 / -inf."""
        return key_rows(self.keys), key_sims(self.keys)


def probe_passes(nprobe: int) -> list[tuple[int, int]]:
    """Probe columns ``[j0, j1)`` searched together: the own list, then all the others.

    Pass 0 (each row's own list) gives every row a k-th best, and that
    threshold alone prunes nearly all of the later entries. Searching
    the other ``nprobe - 1`` columns in one sweep keeps the GEMM blocks
    large (all of a list's probing queries at once); it measured faster than
    doubling passes or one pass per column: small blocks lose more to BLAS
    call and thread overhead than the tighter thresholds save
    (bench/MEASUREMENTS.md, "IVF lists and probe passes").
    """
    return [(0, 1)] + ([(1, nprobe)] if nprobe > 1 else [])


def ivf_all_knn(vectors: np.ndarray, k: int, nlist: int = 0, nprobe: int = 0, seed: int = 42,
                recall_target: float = 0.99) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every row's top-``k`` other rows by cosine via an inverted file, in one process.

    Train on a sample, choose ``nprobe`` (0 = by measured coverage, see
    :func:`choose_nprobe`), assign, then search in ``nprobe`` passes: pass
    ``j`` searches, list by list, the rows whose ``j``-th nearest list it is
    (pass 0: each list against itself), through one :class:`RunningTopK`.
    Nearest lists first means each row has a good k-th best before the far
    lists, so later passes keep few entries. Memory: the vectors once more
    in list order (``N * D * 4``), ``N * nprobe * 4`` of probes, ``N * k *
    8`` of candidates, one tile. Returns ``(rows int64 [N, k'], sims float32
    [N, k'])`` ordered like ``exact_top_k`` (``k' = min(k, N - 1)``) and
    ``info``: nlist, nprobe, the coverage table, timings per step.
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
    t_kmeans = time.perf_counter()
    del sample
    coverage = list_coverage(vectors, centroids, k_out, seed=seed) if not nprobe else {}
    nprobe = int(nprobe or choose_nprobe(coverage, recall_target))
    nprobe = min(nprobe, nlist)
    t1 = time.perf_counter()
    probes = assign_lists(vectors, centroids, nprobe)
    t2 = time.perf_counter()
    own = probes[:, 0]
    order = np.argsort(own, kind="stable")  # rows ascending within each list
    bounds = np.searchsorted(own[order], np.arange(nlist + 1))
    by_list = np.empty((n, vectors.shape[1]), dtype=np.float32)
    for b0 in range(0, n, 65536):  # the vectors in list order: members are slices
        by_list[b0:b0 + 65536] = vectors[order[b0:b0 + 65536]]
    best = RunningTopK(n, k_out)
    pass_seconds = []
    for j0, j1 in probe_passes(nprobe):
        tp = time.perf_counter()
        if j0 == 0:
            q_order, q_bounds = order, bounds
        else:
            cols = probes[:, j0:j1].ravel()
            flat = np.argsort(cols, kind="stable")  # rows ascending within each list
            q_order = flat // (j1 - j0)
            q_bounds = np.searchsorted(cols[flat], np.arange(nlist + 1))
            del cols, flat
        for lst in range(nlist):
            m0, m1 = bounds[lst], bounds[lst + 1]
            queries = q_order[q_bounds[lst]:q_bounds[lst + 1]]
            if m1 == m0 or len(queries) == 0:
                continue
            q_vecs = by_list[m0:m1] if j0 == 0 else vectors[queries]
            best.search(queries, q_vecs, order[m0:m1], by_list[m0:m1], self_block=j0 == 0)
        pass_seconds.append(round(time.perf_counter() - tp, 2))
    out_rows, out_sims = best.result()
    t3 = time.perf_counter()
    sizes = np.diff(bounds)
    groups = sizes + np.bincount(probes.ravel(), minlength=nlist)
    info = {"nlist": nlist, "nprobe": nprobe, "coverage": coverage,
            "train_seconds": t1 - t0, "kmeans_seconds": t_kmeans - t0,
            "calibrate_seconds": t1 - t_kmeans, "assign_seconds": t2 - t1,
            "search_seconds": t3 - t2, "pass_seconds": pass_seconds,
            "similarities": int(best.entries), "survivors": int(best.survivors),
            "largest_list": int(sizes.max()) if n else 0,
            # members + queries of the biggest GroupByKey group of the Beam stage
            "largest_group": int(groups.max()) if n else 0,
            "sum_sq_list": int((sizes.astype(np.int64) ** 2).sum())}
    return out_rows, out_sims, info


def rows_by_list(probes: np.ndarray, nlist: int) -> list[np.ndarray]:
    """Per list: the rows (sorted) with that list in any column of ``probes`` ``[n, p]``."""
    probes = np.asarray(probes)
    n, p = probes.shape if probes.ndim == 2 else (len(probes), 1)
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")  # stable: rows ascending within a list
    rows = order // max(p, 1)
    bounds = np.searchsorted(flat[order], np.arange(nlist + 1))
    return [rows[bounds[i]:bounds[i + 1]] for i in range(nlist)]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
