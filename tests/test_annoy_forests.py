"""A big Annoy forest built as sub-forests in parallel and merged (pipeline/annoy_forests.py).

What a shop relies on: the merged ``annoy.ann`` loads with plain ``AnnoyIndex.load``,
holds every tree of every sub-forest unchanged, answers like a forest of those trees,
and is byte-identical from run to run whatever the machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from annoy import AnnoyIndex

from pipeline import annoy_forests as af
from pipeline import similarity_search as ss


def _vectors(n, dim, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _build(vectors, path, trees, seed):
    index = AnnoyIndex(vectors.shape[1], "angular")
    index.set_seed(seed)
    index.on_disk_build(str(path))
    for i, row in enumerate(vectors.tolist()):
        index.add_item(i, row)
    index.build(trees, n_jobs=1)
    index.unload()


def _trees(path, n_items, dim, n_roots):
    """Each tree as the sorted tuple of its leaves' item sets, read from the raw nodes."""
    nodes = np.fromfile(path, dtype=np.int32).reshape(-1, dim + 3)
    forest = []
    for root in nodes[-n_roots:]:
        stack, leaves = [root], []
        while stack:
            node = stack.pop()
            if node[0] > dim + 2:  # a split: two children, items or tree nodes
                for child in node[1:3]:
                    if child < n_items:
                        leaves.append((int(child),))
                    else:
                        stack.append(nodes[child])
            else:  # a bucket of item numbers
                leaves.append(tuple(sorted(int(x) for x in node[1:1 + node[0]])))
        forest.append(tuple(sorted(leaves)))
    return forest


def test_the_plan_depends_on_size_trees_and_the_parallel_flag_only():
    assert af.forest_plan(af.SPLIT_MIN_ITEMS - 1, 59, 42) == (af.SubForest(59, 42),)
    assert af.forest_plan(10**6, 59, 42, parallel=False) == (af.SubForest(59, 42),)
    assert af.forest_plan(10**6, 1, 42) == (af.SubForest(1, 42),)
    plan = af.forest_plan(af.SPLIT_MIN_ITEMS, 59, 42)
    assert plan == (af.SubForest(30, 42), af.SubForest(29, 43))
    assert sum(part.n_trees for part in plan) == 59
    with pytest.raises(ValueError):
        af.forest_plan(10**6, 0, 42)


def test_a_merged_forest_holds_every_sub_forest_tree_unchanged(tmp_path):
    n, dim = 3000, 16
    vectors = _vectors(n, dim)
    _build(vectors, tmp_path / "a.ann", 3, 7)
    _build(vectors, tmp_path / "b.ann", 2, 8)
    expected = (_trees(tmp_path / "a.ann", n, dim, 3) + _trees(tmp_path / "b.ann", n, dim, 2))

    af.merge_forests([str(tmp_path / "a.ann"), str(tmp_path / "b.ann")], [3, 2], n, dim,
                     str(tmp_path / "m.ann"))

    assert sorted(os.listdir(tmp_path)) == ["m.ann"]
    assert _trees(tmp_path / "m.ann", n, dim, 5) == expected
    merged = AnnoyIndex(dim, "angular")
    merged.load(str(tmp_path / "m.ann"))
    assert merged.get_n_trees() == 5 and merged.get_n_items() == n
    for i in (0, 17, 2999):
        assert merged.get_item_vector(i) == pytest.approx(vectors[i].tolist(), rel=1e-6)
    # Examining every node, the forest returns the exact top-k.
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in (0, 5, 123):
        exact = np.argsort(-(unit @ unit[i]), kind="stable")[:10].tolist()
        assert merged.get_nns_by_item(i, 10, search_k=n * 10) == exact


def test_merging_forests_of_different_items_is_refused_before_writing(tmp_path):
    n, dim = 3000, 16
    _build(_vectors(n, dim, 0), tmp_path / "a.ann", 2, 7)
    _build(_vectors(n, dim, 1), tmp_path / "b.ann", 2, 8)
    before = (tmp_path / "a.ann").read_bytes()
    with pytest.raises(af.ForestMergeError, match="items differ"):
        af.merge_forests([str(tmp_path / "a.ann"), str(tmp_path / "b.ann")], [2, 2], n, dim,
                         str(tmp_path / "m.ann"))
    assert (tmp_path / "a.ann").read_bytes() == before
    assert not (tmp_path / "m.ann").exists()


def test_a_wrong_tree_count_is_refused(tmp_path):
    n, dim = 3000, 16
    vectors = _vectors(n, dim)
    _build(vectors, tmp_path / "a.ann", 3, 7)
    _build(vectors, tmp_path / "b.ann", 2, 8)
    with pytest.raises(af.ForestMergeError, match="root"):
        af.merge_forests([str(tmp_path / "a.ann"), str(tmp_path / "b.ann")], [4, 2], n, dim,
                         str(tmp_path / "m.ann"))


@pytest.mark.parametrize("on_disk,isolated", [(True, True), (True, False), (False, True)])
def test_a_split_build_is_one_forest_with_the_same_bytes_every_time(tmp_path, on_disk,
                                                                    isolated):
    n, dim = af.SPLIT_MIN_ITEMS, 8
    vectors = _vectors(n, dim, 3)
    ss.save_vectors(tmp_path / "v.npy", vectors)
    mapped = ss.load_vectors(tmp_path / "v.npy")
    for name in ("one.ann", "two.ann"):
        ss.build_annoy_index(mapped, tmp_path / name, 5, 11, on_disk=on_disk, isolated=isolated,
                             parallel=True)
    assert (tmp_path / "one.ann").read_bytes() == (tmp_path / "two.ann").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.ann", "two.ann", "v.npy"]

    # The same trees as the two sub-forests of the plan, built one by one.
    plan = af.forest_plan(n, 5, 11)
    assert len(plan) == 2
    expected = []
    for i, part in enumerate(plan):
        _build(vectors, tmp_path / f"part{i}.ann", part.n_trees, part.seed)
        expected += _trees(tmp_path / f"part{i}.ann", n, dim, part.n_trees)
    assert _trees(tmp_path / "one.ann", n, dim, 5) == expected
    index = ss.open_annoy_index(tmp_path / "one.ann", dim)
    assert index.get_n_trees() == 5 and index.get_n_items() == n


def test_the_split_modes_give_the_same_file(tmp_path):
    vectors = _vectors(af.SPLIT_MIN_ITEMS, 8, 4)
    ss.build_annoy_index(vectors, tmp_path / "children.ann", 4, 5, on_disk=True, parallel=True)
    ss.build_annoy_index(vectors, tmp_path / "threads.ann", 4, 5, on_disk=False, parallel=True)
    assert (tmp_path / "children.ann").read_bytes() == (tmp_path / "threads.ann").read_bytes()


def test_a_failed_sub_forest_leaves_no_files(tmp_path, monkeypatch):
    vectors = _vectors(af.SPLIT_MIN_ITEMS, 8, 5)

    def broken_merge(*args, **kwargs):
        raise af.ForestMergeError("broken on purpose")

    monkeypatch.setattr(af, "merge_forests", broken_merge)
    with pytest.raises(af.ForestMergeError):
        ss.build_annoy_index(vectors, tmp_path / "annoy.ann", 4, 5, on_disk=True, parallel=True)
    assert os.listdir(tmp_path) == []


def test_without_parallel_a_big_forest_is_the_single_thread_build(tmp_path):
    """The default build is the one Annoy makes on one thread: the file earlier runs wrote."""
    vectors = _vectors(af.SPLIT_MIN_ITEMS, 8, 6)
    ss.build_annoy_index(vectors, tmp_path / "default.ann", 4, 5, on_disk=True)
    _build(vectors, tmp_path / "plain.ann", 4, 5)
    assert (tmp_path / "default.ann").read_bytes() == (tmp_path / "plain.ann").read_bytes()
