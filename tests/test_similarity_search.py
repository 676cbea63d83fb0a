"""Tests for pipeline.similarity_search: exact and Annoy top-k cosine search."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import similarity_search as ss


def brute_force(queries, vectors, k, query_rows=None):
    """Reference top-k: full similarity matrix, order (sim desc, row asc), self excluded."""
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    if query_rows is not None:
        sims[np.arange(len(queries)), query_rows] = -np.inf
    k_out = min(k, len(vectors) - (query_rows is not None))
    cols = np.broadcast_to(np.arange(len(vectors)), sims.shape)
    order = np.lexsort((cols, -sims), axis=1)[:, :k_out]
    return order, np.take_along_axis(sims, order, axis=1)


def int_vectors(rng, n, d, low=-2, high=3):
    """Small-integer vectors: dot products are exact in float32 and full of ties."""
    return rng.integers(low, high, size=(n, d)).astype(np.float32)


def clustered_unit_vectors(n, d, n_clusters, seed):
    """Unit vectors around random cluster centres, like product embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    x = centres[rng.integers(0, n_clusters, size=n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(found, truth):
    return np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)])


@pytest.fixture(scope="module")
def clustered():
    return clustered_unit_vectors(5000, 64, n_clusters=100, seed=3)


@pytest.fixture(scope="module")
def clustered_index(clustered, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "index.ann"
    ss.build_annoy_index(clustered, path, ss.default_n_trees(*clustered.shape), seed=7)
    return path


# --- exact_top_k --------------------------------------------------------


@pytest.mark.parametrize("n,d,k", [(50, 4, 5), (50, 4, 49), (50, 4, 50), (50, 4, 200), (2, 3, 5)])
def test_exact_matches_brute_force_with_ties(n, d, k):
    rng = np.random.default_rng(n + k)
    vectors = int_vectors(rng, n, d)
    rows = np.arange(n)
    idx, sims = ss.exact_top_k(vectors, vectors, k, query_rows=rows)
    ref_idx, ref_sims = brute_force(vectors, vectors, k, rows)
    assert idx.shape == (n, min(k, n - 1))
    assert idx.dtype == np.int64 and sims.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sims, ref_sims.astype(np.float32))


def test_exact_group_selection_path_breaks_ties_by_row():
    # N >> 128 * (k + 1) exercises the group-max selection; values in
    # {-1, 0, 1} make hundreds of rows tie at the k-th place.
    rng = np.random.default_rng(0)
    vectors = int_vectors(rng, 4000, 6, low=-1, high=2)
    rows = rng.choice(4000, size=150, replace=False)
    idx, sims = ss.exact_top_k(vectors[rows], vectors, 20, query_rows=rows)
    ref_idx, ref_sims = brute_force(vectors[rows], vectors, 20, rows)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sims, ref_sims)


def test_exact_never_returns_self_even_with_duplicates():
    base = clustered_unit_vectors(30, 5, 3, seed=1)
    vectors = np.concatenate([base, base, base])  # every vector appears 3 times
    rows = np.arange(len(vectors))
    idx, sims = ss.exact_top_k(vectors, vectors, 5, query_rows=rows)
    assert not np.any(idx == rows[:, None])
    # The two other copies are each product's best matches, lowest row first.
    twins = np.sort(np.stack([(rows + 30) % 90, (rows + 60) % 90], axis=1), axis=1)
    np.testing.assert_array_equal(idx[:, :2], twins)


def test_exact_without_query_rows_includes_the_row_itself():
    vectors = clustered_unit_vectors(40, 8, 4, seed=2)
    idx, sims = ss.exact_top_k(vectors, vectors, 50)
    assert idx.shape == (40, 40)
    np.testing.assert_array_equal(idx[:, 0], np.arange(40))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "n,block_size",
    # (3000, 168000): 60 x 2800 tiles, the group selection plus a 200-wide tail tile.
    [(300, 1), (300, 7), (3000, 300), (3000, 5000), (3000, 168000), (3000, 10**9)],
)
def test_blocked_equals_unblocked(n, block_size):
    rng = np.random.default_rng(2)
    vectors = int_vectors(rng, n, 5)
    rows = rng.choice(n, size=60, replace=False)
    whole = ss.exact_top_k(vectors[rows], vectors, 20, query_rows=rows, block_size=10**9)
    blocked = ss.exact_top_k(vectors[rows], vectors, 20, query_rows=rows, block_size=block_size)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_array_equal(blocked[1], whole[1])


def test_tile_memory_is_bounded_whatever_n(monkeypatch):
    import tracemalloc

    monkeypatch.setattr(ss, "EXACT_TILE_BYTES", 4 * 2**20)
    vectors = clustered_unit_vectors(60000, 16, 50, seed=4)
    rows = np.arange(300)
    tracemalloc.start()
    ss.exact_top_k(vectors[rows], vectors, 20, query_rows=rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Unbounded, the 300 x 60000 similarity matrix alone would be 72 MB.
    assert peak < 8 * 2**20


def test_exact_rejects_bad_input():
    v = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError):
        ss.exact_top_k(v, np.eye(4, dtype=np.float32), 1)
    with pytest.raises(ValueError):
        ss.exact_top_k(v, v, 1, query_rows=np.array([0, 1, 3]))
    with pytest.raises(ValueError):
        ss.exact_top_k(v, v, 1, query_rows=np.array([0, 1]))
    big = clustered_unit_vectors(3000, 4, 3, seed=0)
    bad_query = big[:2].copy()
    bad_query[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ss.exact_top_k(bad_query, big, 5)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 6),
    k=st.integers(0, 45),
    block_size=st.one_of(st.none(), st.integers(1, 200)),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_top_k_property(n, d, k, block_size, seed):
    rng = np.random.default_rng(seed)
    vectors = int_vectors(rng, n, d)
    rows = rng.integers(0, n, size=min(n, 10))
    idx, sims = ss.exact_top_k(vectors[rows], vectors, k, query_rows=rows, block_size=block_size)
    assert idx.shape == sims.shape == (len(rows), min(k, n - 1))
    assert np.all(np.diff(sims, axis=1) <= 0)
    assert not np.any(idx == rows[:, None])
    ref_idx, ref_sims = brute_force(vectors[rows], vectors, k, rows)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sims, ref_sims)


# --- Annoy ------------------------------------------------------------


def test_annoy_recall_vs_exact_on_clustered_data(clustered, clustered_index):
    index = ss.open_annoy_index(clustered_index, clustered.shape[1])
    rows = np.random.default_rng(5).choice(len(clustered), size=600, replace=False)
    found, sims = ss.annoy_top_k(index, clustered, rows, 20)
    truth, _ = ss.exact_top_k(clustered[rows], clustered, 20, query_rows=rows)
    assert found.shape == (600, 20)
    assert recall(found, truth) >= 0.99
    assert not np.any(found == rows[:, None])
    assert np.all(np.diff(sims, axis=1) <= 0)
    # Similarities are the exact re-ranked cosines of the returned rows.
    expected = np.einsum("qd,qkd->qk", clustered[rows], clustered[found])
    np.testing.assert_allclose(sims, expected, atol=1e-6)


def test_annoy_short_candidate_lists_fall_back_to_exact(tmp_path):
    # With D=2 Annoy leaves hold at most 4 items, so search_k=1 returns
    # fewer candidates than k; those queries must be answered exactly.
    vectors = clustered_unit_vectors(500, 2, 5, seed=6)
    path = tmp_path / "small.ann"
    ss.build_annoy_index(vectors, path, n_trees=2, seed=1)
    index = ss.open_annoy_index(path, 2)
    rows = np.arange(0, 500, 7)
    found, sims = ss.annoy_top_k(index, vectors, rows, 10, candidates=10, search_k=1)
    ref_idx, ref_sims = ss.exact_top_k(vectors[rows], vectors, 10, query_rows=rows)
    np.testing.assert_array_equal(found, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    # Lists between k and `candidates` long: the unused slots must never surface.
    found, sims = ss.annoy_top_k(index, vectors, rows, 2, candidates=10, search_k=1)
    assert np.all(found >= 0) and np.all(found[:, 0] != found[:, 1])
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", vectors[rows], vectors[found]), atol=1e-6)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("on_disk", [False, True])
def test_build_is_byte_identical(clustered, tmp_path, on_disk):
    vectors = clustered[:2000]
    paths = [tmp_path / f"{name}.ann" for name in ("a", "b", "other_seed")]
    ss.build_annoy_index(vectors, paths[0], n_trees=8, seed=11, on_disk=on_disk)
    ss.build_annoy_index(vectors, paths[1], n_trees=8, seed=11, on_disk=on_disk)
    ss.build_annoy_index(vectors, paths[2], n_trees=8, seed=12, on_disk=on_disk)
    assert sha256(paths[0]) == sha256(paths[1])
    assert sha256(paths[0]) != sha256(paths[2])
    assert not list(tmp_path.glob("*.building"))


def test_on_disk_and_in_memory_builds_write_the_same_file(clustered, tmp_path):
    vectors = clustered[:1000]
    ss.build_annoy_index(vectors, tmp_path / "mem.ann", n_trees=4, seed=3, on_disk=False)
    ss.build_annoy_index(vectors, tmp_path / "disk.ann", n_trees=4, seed=3, on_disk=True)
    assert sha256(tmp_path / "mem.ann") == sha256(tmp_path / "disk.ann")


def test_annoy_queries_are_deterministic(clustered, clustered_index):
    rows = np.arange(0, 5000, 11)
    first = ss.annoy_top_k(ss.open_annoy_index(clustered_index, 64), clustered, rows, 20)
    again = ss.annoy_top_k(ss.open_annoy_index(clustered_index, 64), clustered, rows, 20)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    # Query order and batching do not change a row's answer.
    reversed_ = ss.annoy_top_k(ss.open_annoy_index(clustered_index, 64), clustered, rows[::-1], 20)
    np.testing.assert_array_equal(reversed_[0][::-1], first[0])


def test_annoy_rejects_mismatched_vectors(clustered, clustered_index):
    index = ss.open_annoy_index(clustered_index, 64)
    with pytest.raises(ValueError):
        ss.annoy_top_k(index, clustered[:100], np.arange(10), 5)


# --- stored vectors ---------------------------------------------------


def test_memmapped_vectors_give_the_same_results(clustered, clustered_index, tmp_path):
    path = tmp_path / "vectors.npy"
    ss.save_vectors(path, clustered)
    loaded = ss.load_vectors(path)
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, clustered)
    rows = np.arange(0, 5000, 50)
    mem = ss.exact_top_k(clustered[rows], clustered, 20, query_rows=rows)
    mm = ss.exact_top_k(np.asarray(loaded[rows]), loaded, 20, query_rows=rows)
    np.testing.assert_array_equal(mm[0], mem[0])
    index = ss.open_annoy_index(clustered_index, 64)
    np.testing.assert_array_equal(
        ss.annoy_top_k(index, loaded, rows, 20)[0], ss.annoy_top_k(index, clustered, rows, 20)[0]
    )
    assert not isinstance(ss.load_vectors(path, mmap=False), np.memmap)


def test_load_vectors_refuses_pickle_and_wrong_dtype(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        ss.load_vectors(tmp_path / "objects.npy", mmap=False)
    np.save(tmp_path / "f64.npy", np.zeros((3, 2)))
    with pytest.raises(ValueError):
        ss.load_vectors(tmp_path / "f64.npy")


# --- parameters and conversions ---------------------------------------


def test_choose_search():
    assert ss.choose_search(1000) == "exact"
    assert ss.choose_search(ss.IVF_MIN_N) == "exact"
    assert ss.choose_search(ss.IVF_MIN_N + 1) == "ivf"
    assert ss.choose_search(10, "annoy") == "annoy"
    assert ss.choose_search(10, "ivf") == "ivf"
    assert ss.choose_search(10**8, "exact") == "exact"
    assert ss.choose_search(500, exact_max_n=100) == "ivf"
    with pytest.raises(ValueError):
        ss.choose_search(10, "faiss")


def test_default_parameters_are_usable():
    for n, d in [(1, 2), (5000, 64), (10**6, 1280)]:
        trees = ss.default_n_trees(n, d)
        assert trees >= 1
        assert ss.default_search_k(trees, ss.default_candidates(20)) >= ss.default_candidates(20)
    assert ss.default_candidates(20) > 20


def test_cosine_from_angular_inverts_annoy_distance(clustered, clustered_index):
    index = ss.open_annoy_index(clustered_index, 64)
    for i, j in [(0, 1), (10, 4000), (7, 7)]:
        expected = float(clustered[i] @ clustered[j])
        assert ss.cosine_from_angular(index.get_distance(i, j)) == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(
        ss.cosine_from_angular(np.array([0.0, np.sqrt(2), 2.0])), [1, 0, -1], atol=1e-12
    )


def test_round_similarity():
    assert ss.round_similarity(np.float32(0.123456)) == 0.1235
    assert repr(ss.round_similarity(np.float32(0.1234))) == "0.1234"
    np.testing.assert_array_equal(ss.round_similarity(np.array([0.99999, -0.00004])), [1.0, -0.0])


def test_auto_threshold_follows_the_measured_crossover_by_dimension():
    from pipeline.similarity_search import EXACT_MAX_N, choose_search, exact_max_n_for

    assert exact_max_n_for(1280) == EXACT_MAX_N
    assert exact_max_n_for(256) >= 1_000_000 > exact_max_n_for(512) > EXACT_MAX_N
    # Above IVF_MIN_N the inverted file beats both, whatever the dimension.
    assert choose_search(300_000, "auto", exact_max_n_for(256)) == "ivf"
    assert choose_search(300_000, "auto", exact_max_n_for(1280)) == "ivf"


# --- a full disk during the on-disk Annoy build (issue 15) ---------------------------------


def _small_tmpfs(path, size):
    import os

    path.mkdir()
    if os.system(f"mount -t tmpfs -o size={size} tmpfs {path} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    return path


@pytest.mark.parametrize("precheck", [True, False])
def test_a_full_disk_during_the_on_disk_annoy_build_is_enospc_not_sigbus(tmp_path, monkeypatch,
                                                                        precheck):
    import errno
    import os

    from pipeline import similarity_search as ss

    vectors = np.random.default_rng(0).normal(size=(3000, 64)).astype(np.float32)
    if not precheck:  # the items fit; the trees do not: the mapped file's growth hits the limit
        monkeypatch.setattr(ss, "_check_annoy_space", lambda *args: None)
        ss.save_vectors(tmp_path / "v.npy", vectors)
        vectors = ss.load_vectors(tmp_path / "v.npy")  # handed to the child as a file
    disk = _small_tmpfs(tmp_path / "disk", "256k")
    try:
        with pytest.raises(OSError) as caught:
            ss.build_annoy_index(vectors, disk / "annoy.ann", n_trees=10, seed=1, on_disk=True)
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(disk / "annoy.ann")
        assert os.listdir(disk) == []
    finally:
        os.system(f"umount {disk}")


def test_the_isolated_on_disk_build_is_byte_identical_to_the_in_process_one(tmp_path):
    from pipeline import similarity_search as ss

    vectors = np.random.default_rng(1).normal(size=(2000, 32)).astype(np.float32)
    ss.save_vectors(tmp_path / "v.npy", vectors)
    mapped = ss.load_vectors(tmp_path / "v.npy")
    ss.build_annoy_index(mapped, tmp_path / "child.ann", 5, 7, on_disk=True)  # file handed over
    ss.build_annoy_index(vectors, tmp_path / "copy.ann", 5, 7, on_disk=True)  # staged copy
    ss.build_annoy_index(vectors, tmp_path / "here.ann", 5, 7, on_disk=True, isolated=False)
    here = (tmp_path / "here.ann").read_bytes()
    assert (tmp_path / "child.ann").read_bytes() == here == (tmp_path / "copy.ann").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.ann", "copy.ann", "here.ann",
                                                          "v.npy"]


@pytest.mark.parametrize("precheck", [True, False])
def test_a_full_disk_during_a_split_annoy_build_is_enospc_and_leaves_nothing(tmp_path, monkeypatch,
                                                                            precheck):
    """A forest big enough to be built as parallel sub-forests needs their items twice over."""
    import errno
    import os

    from pipeline import annoy_forests
    from pipeline import similarity_search as ss

    vectors = np.random.default_rng(2).normal(
        size=(annoy_forests.SPLIT_MIN_ITEMS, 8)).astype(np.float32)  # 2.2 MB of items per forest
    ss.save_vectors(tmp_path / "v.npy", vectors)
    vectors = ss.load_vectors(tmp_path / "v.npy")
    if not precheck:  # past the check, the children's mapped files hit the limit
        monkeypatch.setattr(ss, "_check_annoy_space", lambda *args: None)
    disk = _small_tmpfs(tmp_path / "disk", "3m")
    try:
        with pytest.raises(OSError) as caught:
            ss.build_annoy_index(vectors, disk / "annoy.ann", n_trees=10, seed=1, on_disk=True,
                                 parallel=True)
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(disk / "annoy.ann")
        assert os.listdir(disk) == []
    finally:
        os.system(f"umount {disk}")
