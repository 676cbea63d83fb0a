"""Top-k cosine similarity search over L2-normalised embedding vectors.

The index/search stage of the pipeline gathers every product's embedding
into one ``[N, D]`` float32 matrix, builds an index once, then asks for the
top-k most similar *other* products of every product. Two strategies:

* ``exact``: blocked matrix products (cosine == dot product for unit vectors)
  with a bounded temporary similarity tile, then a deterministic top-k
  selection. Perfect results; cost grows as N^2 * D.
* ``annoy``: an Annoy angular forest proposes candidates for each product,
  which are then re-ranked by exact cosine on the stored vectors. Cost grows
  roughly as N * search_k * D, at a small recall loss.

Both return results in the same order: similarity descending, ties broken by
row index ascending, so the output is deterministic and the two strategies
agree exactly whenever the candidate set contains the true top-k.

This module is pure numpy/annoy (no Beam) so that it can be tested and
benchmarked on its own; the thresholds below come from
``bench/neighbors_scale.py`` (the figures are in ``bench/MEASUREMENTS.md``).
Stored artefacts use Annoy's own file format and ``.npy`` without pickle.
"""

from __future__ import annotations

import errno
import math
import os
import re

import numpy as np
from annoy import AnnoyIndex

from pipeline import annoy_forests

# Bound on the temporary memory of one exact-search tile: the float32
# similarity tile (4 bytes per query x vector pair) plus the per-group maxima
# used for selection (4 / _SELECT_GROUP bytes per pair), rounded up.
EXACT_TILE_BYTES = 256 * 2**20
_BYTES_PER_TILE_ENTRY = 4.125
# Columns per group in the top-k selection (see _tile_top_k): the group width that
# measured fastest for np.maximum.reduceat (bench/MEASUREMENTS.md, "Exact search kernel").
_SELECT_GROUP = 128
# A tile narrower than this many groups per wanted neighbour (a small
# catalogue) uses narrower groups: the threshold shortcut needs groups >> k.
_MIN_GROUPS_PER_K = 4
# Query rows per tile when the vector axis has to be split; big enough for
# the BLAS kernel to run near peak, small enough to keep tiles square-ish.
_MIN_TILE_QUERIES = 256

# Above this many raw vector bytes the Annoy forest is built straight into
# its memory-mapped file (on_disk_build) instead of in RAM and then saved.
# An in-memory build holds the whole index (items + tree nodes) in private
# memory, more than the vectors themselves (the trees weigh most at low D). Built
# on disk, the private memory stays small whatever the size; the file's pages live
# in the page cache, which the kernel can write back and evict. Peak RSS figures:
# bench/MEASUREMENTS.md, "Annoy build".
ON_DISK_BUILD_BYTES = 256 * 2**20

# Measured crossover at D=1280, see choose_search.
EXACT_MAX_N = 55_000
# Above this many products auto uses the inverted file (pipeline/ivf.py): on the
# clustered data of bench/neighbors_scale.py at D=256 (where exact is cheapest) IVF
# was already the faster at this size, and far faster above it
# (bench/MEASUREMENTS.md, "Exact search vs IVF").
IVF_MIN_N = 20_000

# Queries handed to Annoy and re-ranked together; bounds the gathered
# candidate block to _ANNOY_QUERY_BLOCK * candidates * D * 4 bytes (9 MB for
# 28 candidates at D=1280), under glibc's 32 MB mmap threshold so the block
# is reused from the heap instead of being page-faulted in afresh each time.
_ANNOY_QUERY_BLOCK = 64

SEARCH_MODES = ("auto", "exact", "ivf", "annoy")

# See default_n_trees / default_search_k for the measurements behind these.
_MIN_TREES = 10
_MAX_TREES = 200
_SEARCH_K_FACTOR = 18


def exact_top_k(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    query_rows: np.ndarray | None = None,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the exact top-``k`` rows of ``vectors`` by dot product for each query.

    For L2-normalised float32 inputs the dot product is the cosine
    similarity. ``query_rows[i]``, when given, is the row of query ``i``
    inside ``vectors``; that row is excluded from query ``i``'s results so a
    product is never its own neighbour. Work is tiled so the temporaries of
    one tile stay under ``block_size`` query x vector pairs (default: about
    ``EXACT_TILE_BYTES`` of memory whatever N is); each tile keeps only its
    own top-k, which are merged, so the result does not depend on tiling
    beyond float rounding of the matrix product.

    Results are ordered by similarity descending, ties by row index
    ascending. Returns ``(indices int64 [q, k'], sims float32 [q, k'])`` with
    ``k' = min(k, N - 1)`` when ``query_rows`` is given, else ``min(k, N)``.
    """
    queries = _as_matrix(queries, "queries")
    n_vectors, dim = _matrix_shape(vectors, "vectors")
    if queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, vectors {dim}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n_queries = queries.shape[0]
    rows = _check_query_rows(query_rows, n_queries, n_vectors)
    k_out = min(k, n_vectors - 1 if rows is not None else n_vectors)
    k_out = max(k_out, 0)
    out_idx = np.empty((n_queries, k_out), dtype=np.int64)
    out_sim = np.empty((n_queries, k_out), dtype=np.float32)
    if n_queries == 0 or k_out == 0:
        return out_idx, out_sim

    entries = block_size if block_size is not None else int(EXACT_TILE_BYTES / _BYTES_PER_TILE_ENTRY)
    if entries < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    q_block, v_block = _tile_shape(n_queries, n_vectors, entries)

    # One tile buffer reused for every tile: a fresh multi-100 MB array per
    # tile is page-faulted in again each time, which measured slower
    # (bench/MEASUREMENTS.md, "Exact search kernel").
    tile = np.empty((q_block, v_block), dtype=np.float32)
    for q0 in range(0, n_queries, q_block):
        q1 = min(q0 + q_block, n_queries)
        block_rows = rows[q0:q1] if rows is not None else None
        best_idx = np.empty((q1 - q0, 0), dtype=np.int64)
        best_sim = np.empty((q1 - q0, 0), dtype=np.float32)
        for v0 in range(0, n_vectors, v_block):
            v1 = min(v0 + v_block, n_vectors)
            chunk = np.asarray(vectors[v0:v1], dtype=np.float32)
            sims = tile[: q1 - q0, : v1 - v0]
            np.matmul(queries[q0:q1], chunk.T, out=sims)
            if block_rows is not None:
                _mask_self(sims, block_rows, v0, v1)
            tile_idx, tile_sim = _tile_top_k(sims, min(k_out, v1 - v0))
            tile_idx += v0
            best_idx, best_sim = _merge_top_k(
                np.concatenate([best_idx, tile_idx], axis=1),
                np.concatenate([best_sim, tile_sim], axis=1),
                k_out,
            )
        out_idx[q0:q1] = best_idx
        out_sim[q0:q1] = best_sim

    if rows is not None and np.any(out_idx == rows[:, None]):
        raise ValueError("non-finite similarities: a query row ranked itself among its neighbours")
    return out_idx, out_sim


def build_annoy_index(
    vectors: np.ndarray,
    path: str | os.PathLike,
    n_trees: int,
    seed: int,
    on_disk: bool | None = None,
    isolated: bool = True,
    parallel: bool = False,
) -> None:
    """Build an angular Annoy forest over ``vectors`` (row i = item i) and write it to ``path``.

    Deterministic: the same vectors, ``n_trees`` and ``seed`` give a
    byte-identical file. Annoy's own multi-threaded build appends trees in
    completion order, so it is not used. With ``parallel`` a big forest is
    built as the fixed sub-forests of :func:`pipeline.annoy_forests.forest_plan`
    (each on one thread with its own seed, all at once) and merged into one
    file, which a shop loads like any Annoy index; the plan depends on the
    catalogue size, ``n_trees`` and ``parallel`` only, never on the machine.
    Worth it only when nothing else needs the cores: each sub-forest adds every
    item again, so next to other work the split costs more than it saves
    (bench/MEASUREMENTS.md, "Annoy build").

    With ``on_disk`` (default: when ``vectors.nbytes > ON_DISK_BUILD_BYTES``)
    the forest is built directly in memory-mapped files so the build's
    anonymous memory stays small whatever N is; otherwise it is built in RAM
    and saved. The file is written under a temporary name and renamed, so a
    crash never leaves a truncated index at ``path``.

    A full disk must be an error, not a dead process: Annoy grows its mapped
    file with ``ftruncate`` and writes through the mapping, and a page the
    filesystem cannot back kills the writer with SIGBUS. So the on-disk build
    first checks that the items of every sub-forest fit (``ENOSPC`` at once
    otherwise) and, with ``isolated``, runs in child processes
    (``pipeline/annoy_child.py``): a child killed by SIGBUS is reported as
    ``OSError(ENOSPC)`` naming ``path``. The in-memory build saves with plain
    writes, which report ENOSPC themselves.
    """
    n_vectors, dim = _matrix_shape(vectors, "vectors")
    if n_vectors == 0:
        raise ValueError("cannot build an index over zero vectors")
    if n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    if on_disk is None:
        on_disk = vectors.nbytes > ON_DISK_BUILD_BYTES
    path = os.fspath(path)
    tmp_path = f"{path}.building"
    plan = annoy_forests.forest_plan(n_vectors, int(n_trees), int(seed), parallel)
    parts = [tmp_path] if len(plan) == 1 else [f"{tmp_path}.{i}" for i in range(len(plan))]
    try:
        if on_disk:
            _check_annoy_space(path, n_vectors, dim, len(plan))
        if on_disk and isolated:
            _build_in_children(vectors, path, list(zip(parts, plan)))
        else:
            _build_in_threads(vectors, list(zip(parts, plan)), on_disk)
        if len(plan) > 1:
            annoy_forests.merge_forests(parts, [part.n_trees for part in plan], n_vectors, dim,
                                        tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        for leftover in {tmp_path, *parts}:
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


# Bytes per Annoy angular node besides the vector: n_descendants + two children.
_ANNOY_NODE_HEADER = 12


def _check_annoy_space(path: str, n_vectors: int, dim: int, copies: int = 1) -> None:
    """Raise ENOSPC when the filesystem cannot even hold ``copies`` x the items (trees come on top)."""
    stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    needed = copies * n_vectors * (_ANNOY_NODE_HEADER + 4 * dim)
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device (the Annoy index needs more "
                                    f"than {needed:,} bytes, {free:,} are free)", path)


def _build_here(vectors, tmp_path: str, n_trees: int, seed: int, on_disk: bool) -> None:
    n_vectors, dim = vectors.shape
    index = AnnoyIndex(dim, "angular")
    index.set_seed(int(seed))
    if on_disk:
        index.on_disk_build(tmp_path)
    # Annoy's binding converts a row element by element, a cost per value that
    # adds up to seconds per index (bench/MEASUREMENTS.md, "Annoy build");
    # lists are its fastest input.
    chunk_rows = max(1, (4 * 2**20) // (4 * dim))
    for start in range(0, n_vectors, chunk_rows):
        chunk = np.asarray(vectors[start : start + chunk_rows], dtype=np.float32)
        for offset, row in enumerate(chunk.tolist()):
            index.add_item(start + offset, row)
    index.build(int(n_trees), n_jobs=1)
    if not on_disk:
        index.save(tmp_path)
    index.unload()


def _build_in_threads(vectors, parts: list, on_disk: bool) -> None:
    """Build each ``(file, SubForest)`` of ``parts`` in this process, one thread each.

    Annoy releases the GIL while it builds trees, so the sub-forests' trees
    grow on separate cores; the first error is re-raised once all are done.
    """
    if len(parts) == 1:
        tmp_path, part = parts[0]
        _build_here(vectors, tmp_path, part.n_trees, part.seed, on_disk)
        return
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(parts), thread_name_prefix="annoy") as pool:
        futures = [pool.submit(_build_here, vectors, tmp_path, part.n_trees, part.seed, on_disk)
                   for tmp_path, part in parts]
    for future in futures:
        future.result()


def _build_in_children(vectors, path: str, parts: list) -> None:
    """Run the on-disk builds of ``parts`` in child processes at once; a SIGBUS becomes ENOSPC."""
    import signal
    import subprocess
    import sys

    source, staged = _vectors_file(vectors), None
    if source is None:  # not a whole .npy memmap: hand the children a file of it
        staged = f"{path}.vectors.writing"
        try:
            save_vectors(staged, vectors)
        except OSError as exc:
            if exc.errno and exc.filename is None:
                raise OSError(exc.errno, exc.strerror, path) from exc
            raise
        source = staged
    children: list[subprocess.Popen] = []
    try:
        for tmp_path, part in parts:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline.annoy_child", source, tmp_path,
                 str(int(part.n_trees)), str(int(part.seed))],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                env=dict(os.environ, SIMILARITY_ANNOY_PARENT=str(os.getpid()))))
        stderrs = [child.communicate()[1] for child in children]
        outcomes = [(child.returncode, stderr) for child, stderr in zip(children, stderrs)]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        if staged is not None and os.path.exists(staged):
            os.unlink(staged)
    for returncode, _ in outcomes:
        if returncode == -signal.SIGBUS:
            raise OSError(errno.ENOSPC, "No space left on device (the Annoy build's memory-mapped "
                                        "file could not grow)", path)
    for returncode, stderr in outcomes:
        if returncode != 0:
            last = (stderr.strip().splitlines() or ["no message"])[-1]
            match = re.search(r"\[Errno (\d+)\]", last)
            if match:
                raise OSError(int(match.group(1)), os.strerror(int(match.group(1))), path)
            raise RuntimeError(f"the Annoy build of {path} failed (exit {returncode}): {last}")


def _vectors_file(vectors) -> str | None:
    """The .npy file ``vectors`` maps in whole, or None."""
    filename = getattr(vectors, "filename", None)
    if not isinstance(vectors, np.memmap) or not filename:
        return None
    try:
        whole = np.load(filename, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    same = whole.shape == vectors.shape and whole.dtype == vectors.dtype \
        and whole.offset == vectors.offset
    del whole
    return os.fspath(filename) if same else None


def open_annoy_index(path: str | os.PathLike, dim: int) -> AnnoyIndex:
    """Open a saved angular Annoy index memory-mapped (no prefault).

    Worker processes share the file's pages through the OS page cache
    instead of each reading the whole index into private memory.
    """
    index = AnnoyIndex(int(dim), "angular")
    index.load(os.fspath(path), prefault=False)
    return index


def annoy_top_k(
    index: AnnoyIndex,
    vectors: np.ndarray,
    query_rows: np.ndarray,
    k: int,
    candidates: int | None = None,
    search_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return approximately the top-``k`` neighbours of items ``query_rows`` via Annoy.

    Annoy proposes ``candidates`` (at least ``k'``) neighbours per item
    (``get_nns_by_item``, examining about ``search_k`` items; defaults from
    ``default_candidates`` / ``default_search_k``); the item itself is
    dropped and the rest are re-ranked by exact cosine on ``vectors`` (the
    stored vectors, possibly a memmap), so similarities and ordering
    (descending, ties by row index ascending) match ``exact_top_k``. A query
    whose candidate list comes back shorter than ``k'`` is answered exactly,
    so every row has ``k' = min(k, N - 1)`` results. Several threads may
    query one index at once: Annoy releases the GIL while searching.
    Returns ``(indices int64 [q, k'], sims float32 [q, k'])``.
    """
    n_vectors, dim = _matrix_shape(vectors, "vectors")
    if index.get_n_items() != n_vectors:
        raise ValueError(f"index has {index.get_n_items()} items, vectors {n_vectors} rows")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rows = _check_query_rows(np.asarray(query_rows), len(query_rows), n_vectors)
    assert rows is not None  # only a None query_rows gives None
    k_out = max(min(k, n_vectors - 1), 0)
    if candidates is None:
        candidates = default_candidates(k_out)
    candidates = max(int(candidates), k_out)
    if search_k is None:
        search_k = default_search_k(index.get_n_trees(), candidates)
    out_idx = np.empty((len(rows), k_out), dtype=np.int64)
    out_sim = np.empty((len(rows), k_out), dtype=np.float32)
    if len(rows) == 0 or k_out == 0:
        return out_idx, out_sim

    for b0 in range(0, len(rows), _ANNOY_QUERY_BLOCK):
        block = rows[b0 : b0 + _ANNOY_QUERY_BLOCK]
        cand = np.full((len(block), candidates), -1, dtype=np.int64)
        for i, row in enumerate(block.tolist()):
            found = [j for j in index.get_nns_by_item(row, candidates + 1, search_k) if j != row]
            found = found[:candidates]
            cand[i, : len(found)] = found
        valid = cand >= 0
        gathered = np.asarray(vectors[np.where(valid, cand, 0).ravel()], dtype=np.float32)
        gathered = gathered.reshape(len(block), candidates, dim)
        query_vecs = np.asarray(vectors[block], dtype=np.float32)
        sims = np.matmul(gathered, query_vecs[:, :, None])[:, :, 0]
        sims[~valid] = -np.inf
        best_idx, best_sim = _merge_top_k(cand, sims, k_out)
        short = valid.sum(axis=1) < k_out
        if np.any(short):
            exact_idx, exact_sim = exact_top_k(
                query_vecs[short], vectors, k_out, query_rows=block[short]
            )
            best_idx[short] = exact_idx
            best_sim[short] = exact_sim
        out_idx[b0 : b0 + len(block)] = best_idx
        out_sim[b0 : b0 + len(block)] = best_sim
    return out_idx, out_sim


def exact_max_n_for(dim: int) -> int:
    """The auto threshold for dimension ``dim`` (see :func:`choose_search`'s measurements).

    Exact search cost scales with D, Annoy's barely does, so the crossover
    is taken to scale as 1/D from the D=1280 one; at D <= 256 exact search
    beat Annoy at every N benchmarked (``bench/MEASUREMENTS.md``).
    """
    if dim <= 256:
        return 1_000_000
    return int(EXACT_MAX_N * 1280 / dim) if dim < 1280 else EXACT_MAX_N


def choose_search(n: int, requested: str = "auto", exact_max_n: int = EXACT_MAX_N) -> str:
    """Pick the search strategy (``'exact'``, ``'ivf'`` or ``'annoy'``) for ``n`` products.

    ``'auto'`` is exact search up to ``min(exact_max_n, IVF_MIN_N)`` products
    and the inverted file above (faster than both exact and Annoy from ~20k
    up, see ``IVF_MIN_N``); Annoy stays available when requested.
    ``requested`` other than ``'auto'`` is returned as is (after
    validation). The exact/Annoy crossover behind ``exact_max_n`` (kept for
    callers that compare exact search with Annoy) and the measurements
    behind both thresholds are in ``bench/MEASUREMENTS.md``.
    """
    if requested not in SEARCH_MODES:
        raise ValueError(f"search mode must be one of {SEARCH_MODES}, got {requested!r}")
    if requested != "auto":
        return requested
    return "exact" if n <= min(exact_max_n, IVF_MIN_N) else "ivf"


def default_n_trees(n: int, dim: int) -> int:
    """Number of Annoy trees for ``n`` items of dimension ``dim``: ``ceil(10 * (n/1e5)^0.6 * sqrt(1280/dim))``.

    Clamped to [10, 200]. More trees raise recall at a given ``search_k``
    (they cost build time and little index space); the recall Annoy gets at
    a fixed budget falls as N grows, and falls faster at lower D (leaves hold
    ~D items and the synthetic clusters overlap more), hence both factors.
    Chosen with ``default_search_k`` so that recall@20 >= 0.99 against exact
    search on the clustered synthetic data of ``bench/neighbors_scale.py``;
    the sweep is in ``bench/MEASUREMENTS.md``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    scale = (n / 100_000) ** 0.6 * math.sqrt(1280 / dim)
    return int(min(_MAX_TREES, max(_MIN_TREES, math.ceil(10 * scale))))


def default_candidates(k: int) -> int:
    """Number of Annoy candidates fetched per query (besides the item itself) before the re-rank.

    Annoy computes exact distances for every item it examines and returns
    the best ``n``, so recall depends on ``search_k``, not on ``n``
    (``bench/MEASUREMENTS.md``). A margin of 8 over ``k`` only guards the
    k-th place against float rounding differences between Annoy's distances
    and numpy's dot products.
    """
    return k + 8


def default_search_k(n_trees: int, candidates: int) -> int:
    """Annoy ``search_k`` (items examined per query): ``18 * n_trees * candidates``.

    Annoy's own default is ``n_trees * n``; 18x that was needed for
    recall@20 >= 0.99 with 10 trees and, with ``default_n_trees``, holds up
    to 1M (``bench/MEASUREMENTS.md``). Query time is roughly proportional to
    ``search_k * D``. Capped at Annoy's int32 limit.
    """
    return int(min(2**31 - 1, max(1, _SEARCH_K_FACTOR * n_trees * candidates)))


def cosine_from_angular(d):
    """Convert Annoy's angular distance ``d = sqrt(2 (1 - cos))`` back to cosine similarity."""
    d = np.asarray(d, dtype=np.float64)
    cos = 1.0 - d * d / 2.0
    return float(cos) if cos.ndim == 0 else cos


def round_similarity(x):
    """Round similarities to 4 decimals (in float64) for stable, compact JSON output.

    Rounding in float64 avoids float32 artefacts such as 0.12340000271797180.
    """
    rounded = np.round(np.asarray(x, dtype=np.float64), 4)
    return float(rounded) if rounded.ndim == 0 else rounded


def save_vectors(path: str | os.PathLike, vectors: np.ndarray) -> None:
    """Save an ``[N, D]`` float32 matrix as ``.npy`` (no pickle) for the index directory.

    Written with plain file writes (not a writable memmap, whose page faults
    on a full disk kill the process with SIGBUS) under a temporary name,
    fsync-ed and renamed, so a full disk is an ``OSError`` (ENOSPC) the
    launcher reports, readers never see a partial file, and the temporary
    file is removed on failure.
    """
    n_vectors, dim = _matrix_shape(vectors, "vectors")
    path = os.fspath(path)
    tmp = f"{path}.writing"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": (int(n_vectors), int(dim))}
    chunk_rows = max(1, (64 * 2**20) // (4 * max(dim, 1)))
    try:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            for start in range(0, n_vectors, chunk_rows):
                block = np.ascontiguousarray(vectors[start : start + chunk_rows],
                                             dtype=np.float32)
                handle.write(block.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_vectors(path: str | os.PathLike, n: int, dim: int) -> np.memmap:
    """Create a writable ``[n, dim]`` float32 ``.npy`` memmap at ``path``.

    Lets the pipeline gather vectors larger than RAM straight into the
    index directory; call ``flush()`` when done.
    """
    return np.lib.format.open_memmap(
        os.fspath(path), mode="w+", dtype=np.float32, shape=(int(n), int(dim))
    )


def load_vectors(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load an ``[N, D]`` float32 ``.npy`` matrix, memory-mapped read-only by default.

    Memory mapping lets many worker processes share one copy through the
    OS page cache; pickle is refused.
    """
    vectors = np.load(os.fspath(path), mmap_mode="r" if mmap else None, allow_pickle=False)
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ValueError(
            f"{os.fspath(path)}: expected a 2-D float32 matrix, got {vectors.dtype} {vectors.shape}"
        )
    return vectors


# --- internals -----------------------------------------------------------


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    return array


def _matrix_shape(array: np.ndarray, name: str) -> tuple[int, int]:
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    return int(array.shape[0]), int(array.shape[1])


def _check_query_rows(rows, n_queries: int, n_vectors: int) -> np.ndarray | None:
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.ndim != 1 or len(rows) != n_queries:
        raise ValueError(f"query_rows must have shape ({n_queries},), got {rows.shape}")
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"query_rows must be integers, got {rows.dtype}")
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= n_vectors):
        raise ValueError(f"query_rows must lie in [0, {n_vectors})")
    return rows


def _tile_shape(n_queries: int, n_vectors: int, entries: int) -> tuple[int, int]:
    """Query rows and vector rows per tile, with their product <= ``entries``."""
    whole_rows = entries // n_vectors
    if whole_rows >= min(n_queries, _MIN_TILE_QUERIES):
        return max(1, min(n_queries, whole_rows)), n_vectors
    q_block = max(1, min(n_queries, _MIN_TILE_QUERIES, entries))
    return q_block, max(1, min(n_vectors, entries // q_block))


def _mask_self(sims: np.ndarray, rows: np.ndarray, v0: int, v1: int) -> None:
    inside = (rows >= v0) & (rows < v1)
    sims[np.flatnonzero(inside), rows[inside] - v0] = -np.inf


def _tile_top_k(sims: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``kk`` columns of each row of ``sims`` by (similarity desc, column asc).

    A full ``np.partition`` of every row costs more than the matrix product
    itself at D=256 (bench/MEASUREMENTS.md, "Exact search kernel"). Instead:
    split each row into groups of ``_SELECT_GROUP`` columns (the last one may
    be shorter) and take each group's max, one vectorised pass. The kk-th largest group max ``t`` is a
    lower bound on the row's kk-th largest value, so every top-kk entry
    (ties included) is >= t and lies in a group whose max is >= t. Only those
    few groups are gathered and sorted, ties broken by column. Narrow tiles
    (small catalogues) use narrower groups, so there are still several times
    more groups than ``kk`` and the shortcut still applies.
    """
    n_rows, n_cols = sims.shape
    group = min(_SELECT_GROUP, max(1, n_cols // (_MIN_GROUPS_PER_K * max(kk, 1))))
    n_full = n_cols // group
    if kk >= n_cols or n_full <= kk or group < 2:
        cols = np.broadcast_to(np.arange(n_cols, dtype=np.int64), sims.shape)
        return _merge_top_k(cols, sims, kk)
    split = n_full * group
    # A view, not a copy: only the last axis is split.
    groups = sims[:, :split].reshape(n_rows, n_full, group)
    # reduceat measured faster than groups.max(axis=2) (bench/MEASUREMENTS.md,
    # "Exact search kernel"); it also covers the short last group.
    group_max = np.maximum.reduceat(sims, np.arange(0, n_cols, group), axis=1)
    n_groups = group_max.shape[1]
    threshold = np.partition(group_max, n_groups - kk, axis=1)[:, n_groups - kk]
    r, g = np.nonzero(group_max >= threshold[:, None])

    full = g < n_full
    rows_parts, cols_parts = [], []
    gathered = groups[r[full], g[full]]  # [m, group]
    i, j = np.nonzero(gathered >= threshold[r[full]][:, None])
    rows_parts.append(r[full][i])
    cols_parts.append(g[full][i] * group + j)
    tail_rows = r[~full]
    if len(tail_rows):
        i, j = np.nonzero(sims[tail_rows, split:] >= threshold[tail_rows][:, None])
        rows_parts.append(tail_rows[i])
        cols_parts.append(split + j)
    r = np.concatenate(rows_parts)
    cols = np.concatenate(cols_parts).astype(np.int64, copy=False)
    v = sims[r, cols]
    if np.any(np.bincount(r, minlength=n_rows) < kk):
        raise ValueError("similarities contain NaN: queries and vectors must be finite")
    order = np.lexsort((cols, -v, r))
    r, cols, v = r[order], cols[order], v[order]
    row_starts = np.searchsorted(r, np.arange(n_rows))
    keep = (np.arange(len(r)) - row_starts[r]) < kk
    return cols[keep].reshape(n_rows, kk), v[keep].reshape(n_rows, kk)


def _merge_top_k(idx: np.ndarray, sims: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the best ``kk`` of each row's candidates, ordered by (sim desc, index asc)."""
    order = np.lexsort((idx, -sims), axis=1)[:, :kk]
    return (
        np.take_along_axis(idx, order, axis=1).astype(np.int64, copy=False),
        np.take_along_axis(sims, order, axis=1).astype(np.float32, copy=False),
    )
