"""Read a finished run for loading: its manifest, neighbour lists and embeddings.

Everything a loader publishes comes through here, so the checks live in one
place: a run without ``manifest.json`` is not complete and is refused, and the
neighbour lists and embeddings read back must match the manifest's counts, with
no product twice, and every product id must pass the pipeline's id rule
(:func:`pipeline.product_ids.product_id_problem`: no control characters such as
NUL, at most 512 UTF-8 bytes), which a run written before that rule might not.
A loader that hits one of these errors must not publish.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import orjson
from apache_beam.io.filesystems import FileSystems

from pipeline import files, publish, run_reader
from pipeline.features import FeatureMatrix, read_feature_matrix
from pipeline.product_ids import product_id_problem
from pipeline.run_layout import MANIFEST_FILE


class RunDataError(ValueError):
    """The run directory cannot be published as it is (incomplete or inconsistent)."""


def check_product_id(product_id, where: str) -> None:
    """Raise :class:`RunDataError` when ``product_id`` breaks the id rule.

    Every id a store receives passes here: PostgreSQL refuses a NUL in
    ``text`` and Elasticsearch an ``_id`` over 512 bytes, so such an id stops
    the load with one sentence before anything is published.
    """
    problem = (("non_string_id", "it is not a string") if not isinstance(product_id, str)
               else product_id_problem(product_id))
    if problem is not None:
        raise RunDataError(f"{where} has a product id no store can take ({problem[0]}: "
                           f"{problem[1]}); rerun the pipeline, which refuses such ids")


@dataclass(frozen=True)
class Run:
    """A complete run directory and its manifest."""

    path: str
    manifest: dict

    @property
    def model(self) -> str | None:
        return self.manifest.get("model")

    @property
    def dim(self) -> int | None:
        return self.manifest.get("dim")

    @property
    def top_k(self) -> int | None:
        return self.manifest.get("top_k")

    @property
    def products(self) -> int | None:
        """How many neighbour lists the manifest promises (one per embedded product)."""
        neighbors = self.manifest.get("neighbors") or {}
        if "products" in neighbors:
            return neighbors["products"]
        return (self.manifest.get("counts") or {}).get("embedded")

    @property
    def run_id(self) -> str:
        """A content id of the manifest: the same run always gets the same id."""
        canonical = json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    @property
    def finished_at(self) -> str | None:
        return (self.manifest.get("timings") or {}).get("finished_at")


def open_run(run_dir: str) -> Run:
    """Open a run directory, refusing one without ``manifest.json``.

    The pipeline writes the manifest last, only when every row is accounted for,
    so its absence means the run is still going, failed, or was interrupted —
    loading it would publish a partial catalogue. ``ROOT/LATEST`` and an output
    root are accepted and resolved to the run they point to; a run still marked
    INCOMPLETE (not yet verified and published) is refused.
    """
    run_dir = publish.resolve_run(run_dir)
    if run_reader.is_marked_incomplete(run_dir):
        raise RunDataError(
            f"{run_dir} is not a complete run (it is still marked {publish.INCOMPLETE}); "
            f"point --run at ROOT/LATEST or a published run")
    path = files.join(run_dir, MANIFEST_FILE)
    if not FileSystems.exists(path):
        raise RunDataError(
            f"{run_dir} is not a complete run (it has no {MANIFEST_FILE}); wait for the "
            f"pipeline to finish or point --run at a finished run")
    try:
        manifest = files.read_json(path)
    except ValueError as exc:
        raise RunDataError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise RunDataError(f"{path} is not a JSON object")
    if "neighbors" not in manifest:
        raise RunDataError(f"{run_dir} is a features-only run (--features_only) and has no "
                           f"neighbour lists to load; export a run that computed neighbours")
    return Run(run_dir, manifest)


def neighbor_files(run: Run) -> list[str]:
    """The neighbour shards of a run, in name order (= product id ranges)."""
    return run_reader.neighbor_paths(run.path)


def iter_neighbor_lists(run: Run) -> Iterator[tuple[str, list[dict]]]:
    """Stream ``(product_id, neighbors)`` from the run's shards, checking as it goes.

    ``neighbors`` is the published list (``{"product_id", "similarity"}``, best
    first). Raises :class:`RunDataError` on a product seen twice and, once the
    shards are exhausted, when the number of lists differs from the manifest's —
    so a consumer that only commits after the iterator ends never publishes a
    partial or doubled run.
    """
    seen: set[str] = set()
    for path in neighbor_files(run):
        with FileSystems.open(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = orjson.loads(raw)
                    product_id, neighbors = record["product_id"], record["neighbors"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    raise RunDataError(f"{path} line {number} is not a neighbour record "
                                       f"({exc})") from exc
                check_product_id(product_id, f"{path} line {number}")
                if product_id in seen:
                    raise RunDataError(f"product {product_id!r} has two neighbour lists "
                                       f"(second in {path} line {number})")
                seen.add(product_id)
                yield product_id, neighbors
    expected = run.products
    if expected is not None and len(seen) != expected:
        raise RunDataError(f"{run.path} has {len(seen)} neighbour lists but its manifest "
                           f"promises {expected}; refusing to publish a partial run")


def read_embeddings(run: Run) -> FeatureMatrix:
    """All embeddings of the run (sorted by product id), checked against the manifest.

    The vectors must come from the manifest's model, have its dimension and
    cover as many products as it says were embedded.
    """
    paths = run_reader.feature_paths(run.path)
    try:
        matrix = read_feature_matrix(paths)
    except ValueError as exc:  # mixed models, duplicate ids, ragged vectors
        raise RunDataError(f"{run.path} features cannot be published: {exc}") from exc
    for product_id in matrix.product_ids:
        check_product_id(product_id, f"{run.path} features")
    expected = (run.manifest.get("counts") or {}).get("embedded", run.products)
    if expected is not None and matrix.count != expected:
        raise RunDataError(f"{run.path} has {matrix.count} feature rows but its manifest "
                           f"says {expected} products were embedded")
    if matrix.count and run.dim is not None and matrix.vectors.shape[1] != run.dim:
        raise RunDataError(f"embeddings have {matrix.vectors.shape[1]} dimensions but the "
                           f"manifest says {run.dim}")
    if matrix.count and run.model is not None and matrix.model_id != run.model:
        raise RunDataError(f"embeddings come from {matrix.model_id!r} but the manifest says "
                           f"{run.model!r}")
    return matrix


def embedding_rows(matrix: FeatureMatrix) -> dict[str, int]:
    """product id → its row in ``matrix.vectors``, to join embeddings onto neighbour lists."""
    return {pid: i for i, pid in enumerate(matrix.product_ids)}
