"""One Annoy forest from sub-forests built apart: how many, their seeds, and the merge.

Annoy builds a forest's trees one after another on one thread, or on several
threads that append trees, and number their nodes, in completion order, so a
threaded build's file changes from run to run. To use more than one core and
keep the bytes a function of the input alone, the forest is built as a fixed
number of sub-forests (:func:`forest_plan`: it depends on the catalogue size
and the tree count, never on the machine), each on one thread with its own
seed, in parallel, and then merged into the single ``annoy.ann`` a shop loads
with ``AnnoyIndex.load``.

The merge relies on the layout of an angular Annoy file (Annoy 1.17, the version
``requirements.txt`` pins), checked on every merge:

* the file is an array of equal-sized nodes, ``int32 n_descendants``,
  ``int32 children[2]`` (a union with the item's norm), ``float32 v[dim]``;
* nodes ``0 .. n_items-1`` are the items, the same in every sub-forest built
  from the same rows;
* then the tree nodes: a node with ``n_descendants > K`` (``K = dim + 2``) is a
  split whose two children are item numbers (below ``n_items``) or tree-node
  numbers; a node with ``2 <= n_descendants <= K`` is a bucket listing item
  numbers only; a root has ``n_descendants == n_items``;
* the file ends with a copy of each root, in tree order; ``load`` finds the
  roots by scanning those copies from the end.

So merging moves each later sub-forest's tree nodes up by the number of tree
nodes before them, renumbers the split nodes' tree-node children by the same
amount, and writes every sub-forest's root copies at the end. The trees are
the sub-forests' trees, unchanged: a merged forest answers exactly like one
forest holding the same trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# Below this many items one forest is built: small builds take seconds, and
# their index stays the exact single-forest file earlier runs wrote.
SPLIT_MIN_ITEMS = 50_000
# Sub-forests of one split build: the cores of the 2-vCPU machines this runs on
# (a Dataflow n1-standard-2 worker, the benchmark machine). Fixed, so that the
# bytes do not depend on the machine that builds them.
SPLIT_FORESTS = 2

_HEADER_INTS = 3  # n_descendants, children[0], children[1]
_CHUNK_NODES = 65_536


class ForestMergeError(ValueError):
    """The sub-forest files do not have the layout the merge relies on."""


@dataclass(frozen=True, slots=True)
class SubForest:
    """One part of a split build: how many trees, and the seed its trees come from."""

    n_trees: int
    seed: int


def forest_plan(n_items: int, n_trees: int, seed: int,
                parallel: bool = True) -> tuple[SubForest, ...]:
    """The sub-forests that make up a forest of ``n_trees`` trees over ``n_items`` items.

    One sub-forest (the plain single-threaded build with ``seed``) when not
    ``parallel``, below ``SPLIT_MIN_ITEMS`` items or for a single tree; otherwise ``SPLIT_FORESTS``
    parts with as equal tree counts as possible (the first ones get the extra
    trees) and seeds ``seed, seed + 1, ...``. The plan is what makes the file's
    bytes reproducible, so it depends on nothing but its arguments.
    """
    if n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    if not parallel or n_items < SPLIT_MIN_ITEMS or n_trees < 2:
        return (SubForest(n_trees, seed),)
    parts = min(SPLIT_FORESTS, n_trees)
    base, extra = divmod(n_trees, parts)
    return tuple(SubForest(base + (1 if i < extra else 0), seed + i) for i in range(parts))


def node_ints(dim: int) -> int:
    """int32 words per node of an angular Annoy file of dimension ``dim``."""
    return _HEADER_INTS + dim


def merge_forests(paths: list[str], n_trees: list[int], n_items: int, dim: int,
                  out_path: str) -> None:
    """Merge sub-forest files built over the same ``n_items`` rows into ``out_path``.

    ``paths[i]`` holds ``n_trees[i]`` trees. The first file becomes the output
    (renamed, its root copies cut off, the others' tree nodes and every root copy
    appended), so the disk holds at most the sub-forests at once; the other files
    are removed once merged. Raises :class:`ForestMergeError` when a file does
    not have the layout described in the module docstring (different items,
    wrong size, roots where none should be), before ``out_path`` is written.
    """
    if len(paths) != len(n_trees) or not paths:
        raise ValueError("one tree count per sub-forest file is needed")
    if n_items <= dim + 2:
        raise ForestMergeError(f"{n_items} items fit in one bucket; such a forest is not split")
    words = node_ints(dim)
    node_bytes = 4 * words
    layouts = [_check_layout(path, trees, n_items, node_bytes)
               for path, trees in zip(paths, n_trees)]
    _check_same_items(paths, n_items, node_bytes)

    roots: list[np.ndarray] = []
    offset = 0  # tree nodes of the sub-forests before this one
    with open(paths[0], "r+b") as out:
        for index, (path, trees) in enumerate(zip(paths, n_trees)):
            body_end = layouts[index]
            nodes = np.memmap(path, dtype=np.int32, mode="r", shape=(body_end + trees, words))
            roots.append(_renumbered(np.array(nodes[body_end:]), offset, n_items, dim))
            if index > 0:
                out.seek(node_bytes * (n_items + offset))
                for start in range(n_items, body_end, _CHUNK_NODES):
                    block = np.array(nodes[start:min(body_end, start + _CHUNK_NODES)])
                    out.write(_renumbered(block, offset, n_items, dim).tobytes())
            offset += body_end - n_items
            del nodes
        out.seek(node_bytes * (n_items + offset))
        out.truncate()
        for block in roots:
            out.write(block.tobytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(paths[0], out_path)
    for path in paths[1:]:
        os.unlink(path)


def _check_layout(path: str, trees: int, n_items: int, node_bytes: int) -> int:
    """Nodes of ``path`` before its root copies; raise unless its last ``trees`` nodes are roots."""
    size = os.path.getsize(path)
    if size % node_bytes:
        raise ForestMergeError(f"{path}: {size} bytes is not a whole number of "
                               f"{node_bytes}-byte nodes")
    count = size // node_bytes
    body = count - trees
    if trees < 1 or body <= n_items:
        raise ForestMergeError(f"{path}: {count} nodes cannot hold {n_items} items "
                               f"and {trees} trees")
    words = node_bytes // 4
    nodes = np.memmap(path, dtype=np.int32, mode="r", shape=(count, words))
    if not np.all(nodes[body:, 0] == n_items):
        raise ForestMergeError(f"{path}: its last {trees} nodes are not root copies")
    if nodes[body - 1, 0] != n_items or nodes[body - 1 - 1, 0] == n_items:
        # The last tree's root is the last tree node (Annoy allocates a split
        # node after its children), and exactly one root precedes the copies.
        raise ForestMergeError(f"{path}: the trees do not end with their last root")
    del nodes
    return body


def _check_same_items(paths: list[str], n_items: int, node_bytes: int) -> None:
    """Raise unless every file's item nodes are byte-identical to the first file's."""
    span = n_items * node_bytes
    step = 64 * 2**20
    handles = [open(path, "rb") for path in paths]
    try:
        for start in range(0, span, step):
            want = handles[0].read(min(step, span - start))
            for path, handle in zip(paths[1:], handles[1:]):
                if handle.read(len(want)) != want:
                    raise ForestMergeError(f"{path}: its items differ from {paths[0]}'s")
    finally:
        for handle in handles:
            handle.close()


def _renumbered(block: np.ndarray, offset: int, n_items: int, dim: int) -> np.ndarray:
    """``block`` (tree nodes) with the split nodes' tree-node children moved up by ``offset``."""
    if offset == 0:
        return block
    block = block.copy()
    split = block[:, 0] > dim + 2
    for column in (1, 2):
        children = block[:, column]
        moved = split & (children >= n_items)
        children[moved] += offset
    return block
