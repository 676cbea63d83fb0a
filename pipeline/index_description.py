"""What describes one built index (a partition's), and one neighbour shard's work on it.

An :class:`IndexDescription` is made by the index stage in three steps, each a new
record (``dataclasses.replace``; an emitted one is never changed, Beam's rule):

    split (vectors and ids written)  --plan-->  search settings  --build-->  forest built
    index_dir, partition, count,                search, n_trees,            metric, top_k,
    dim, model, max_exclude_group,              search_k, candidates,       build timings,
    split_seconds                               query_k, seed, files        IVF centroid file

and the IVF training adds ``nlist``/``nprobe`` (and its coverage figures). The
neighbour stages, the manifest and the query API read its fields. It turns into the
``index/meta.json`` document only at the edge, :meth:`IndexDescription.as_meta`
(keys in the order that file has always had), and a ``meta.json`` read back becomes
one with :meth:`IndexDescription.from_meta`. A :class:`ShardWork` is one neighbour
shard's row range of a description.

Frozen, with ``__slots__``, like the records of :mod:`pipeline.records` (Beam encodes
them with its pickling fallback coder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# The keys of ``meta.json``, in the file's order.
META_KEYS = ("model", "partition", "dim", "metric", "n_trees", "seed", "count", "search",
             "search_k", "candidates", "top_k", "query_k", "files", "build_seconds",
             "annoy_build_seconds")


@dataclass(frozen=True, slots=True)
class IndexDescription:
    """One partition's index: where it is, what it holds and how it is searched.

    ``partition`` is the partition value (``None`` for a whole-catalogue index);
    ``files`` names the index files (``annoy``, ``vectors``, ``ids`` and, once built
    with IVF search, ``ivf_centroids``; ``annoy`` is None for an empty index). Fields
    after ``split_seconds`` are None until the step that sets them has run.
    """

    index_dir: str | None
    partition: Any
    count: int
    dim: int
    model: str | None
    max_exclude_group: int = 1
    split_seconds: float = 0.0
    # Set by the plan (BuildAnnoyFn.plan).
    search: str | None = None
    n_trees: int | None = None
    search_k: int | None = None
    candidates: int | None = None
    query_k: int | None = None
    seed: int | None = None
    files: Mapping[str, str | None] | None = None
    # Set when the forest is built (BuildAnnoyFn.build).
    metric: str | None = None
    top_k: int | None = None
    build_seconds: float | None = None
    annoy_build_seconds: float | None = None
    # Set by the IVF training (TrainIvfFn).
    nlist: int | None = None
    nprobe: int | None = None
    ivf_coverage: Mapping[str, float] | None = None
    ivf_centroids: str | None = None
    ivf_train_seconds: float | None = None

    @property
    def has_annoy(self) -> bool:
        """Whether the neighbour queries use this index's Annoy forest."""
        return self.search == "annoy" and (self.files or {}).get("annoy") is not None

    def as_meta(self) -> dict:
        """The ``meta.json`` document of this index (built), keys in :data:`META_KEYS` order."""
        return {key: getattr(self, key) for key in META_KEYS}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], index_dir: str | None = None) -> IndexDescription:
        """The description a ``meta.json`` document holds (``index_dir``: where it was read).

        Keys it lacks (an older or hand-written file) are None; ``count`` is required.
        """
        values: dict[str, Any] = {key: meta.get(key) for key in META_KEYS}
        values["count"] = meta["count"]
        return cls(index_dir=index_dir, **values)


@dataclass(frozen=True, slots=True)
class ShardWork:
    """One neighbour shard's work: rows ``start``..``end`` of ``index``, shard ``shard`` of
    ``n_shards`` (numbered across all partitions)."""

    index: IndexDescription
    start: int
    end: int
    shard: int
    n_shards: int
