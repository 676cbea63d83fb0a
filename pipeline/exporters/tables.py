"""The relational shape of a run, shared by the PostgreSQL and SQLite loaders.

``product_neighbors(product_id, rank, neighbor_id, similarity)`` holds one row
per (product, neighbour), rank 1 being the most similar; primary key
``(product_id, rank)``, whose leading column also serves lookups by product id.
``product_embeddings(product_id, model, embedding)`` is optional.
``similarity_runs`` records which run (model, counts, manifest) the live tables
came from; it is written in the same transaction that swaps the tables in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterator

from pipeline.exporters.run_data import Run, RunDataError, iter_neighbor_lists

NEIGHBORS = "product_neighbors"
EMBEDDINGS = "product_embeddings"
RUNS = "similarity_runs"
STAGING_SUFFIX = "__staging"
OLD_SUFFIX = "__old"
# PostgreSQL truncates identifiers at 63 bytes; the longest name we derive is the
# embeddings staging table's primary key.
_MAX_PREFIX = 63 - len(EMBEDDINGS + STAGING_SUFFIX + "_pkey")
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class TableNames:
    """Live and staging names of the tables a load writes, with a common prefix."""

    prefix: str = ""

    def live(self, base: str) -> str:
        return f"{self.prefix}{base}"

    def staging(self, base: str) -> str:
        return f"{self.prefix}{base}{STAGING_SUFFIX}"

    def old(self, base: str) -> str:
        return f"{self.prefix}{base}{OLD_SUFFIX}"


def table_names(prefix: str = "") -> TableNames:
    """Validated table names for ``prefix`` (letters, digits, underscores; may be empty).

    The prefix is part of SQL identifiers, so anything else is refused rather
    than quoted into surprising names.
    """
    if prefix and (not _PREFIX.match(prefix) or len(prefix) > _MAX_PREFIX):
        raise RunDataError(f"--table_prefix {prefix!r} must be letters, digits and "
                           f"underscores (not starting with a digit), at most {_MAX_PREFIX} "
                           f"characters")
    return TableNames(prefix)


@dataclass
class LoadCounts:
    """Rows a load put into the live tables."""

    products: int = 0
    neighbor_rows: int = 0
    embeddings: int | None = None


def neighbor_rows(run: Run, counts: LoadCounts | None = None
                  ) -> Iterator[tuple[str, int, str, float]]:
    """``(product_id, rank, neighbor_id, similarity)`` rows, rank 1 = most similar.

    Ranks follow the published order (best first), so ``ORDER BY rank`` gives
    the list exactly as the pipeline wrote it. ``counts``, when given, is
    updated as rows stream (products include any with an empty list).
    """
    for product_id, neighbors in iter_neighbor_lists(run):
        if counts is not None:
            counts.products += 1
            counts.neighbor_rows += len(neighbors)
        for rank, neighbor in enumerate(neighbors, start=1):
            yield product_id, rank, neighbor["product_id"], float(neighbor["similarity"])


def run_record(run: Run, counts: LoadCounts, with_embeddings: bool) -> dict:
    """The ``similarity_runs`` row describing the run now live."""
    return {
        "run_id": run.run_id,
        "run_dir": run.path,
        "model": run.model,
        "dim": run.dim,
        "top_k": run.top_k,
        "products": counts.products,
        "neighbor_rows": counts.neighbor_rows,
        "embeddings": counts.embeddings,
        "with_embeddings": with_embeddings,
        "run_finished_at": run.finished_at,
        "manifest": json.dumps(run.manifest, sort_keys=True),
    }
