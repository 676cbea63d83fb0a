"""A run's settings, grouped by concern, fixed by the launcher before the run starts.

``RunConfig`` is a composition of small frozen groups instead of one flat bag, so
each stage receives the group it reads (``BuildIndex`` a :class:`SearchConfig`, the
fetch stage a ``FetchConfig``) and a new option lands in exactly one group:

* the catalogue: :class:`pipeline.catalog.CatalogInfo` (what start-up learned about it);
* :class:`ModelConfig`: the model and how a worker runs it;
* the fetch: :class:`pipeline.http_fetch.FetchConfig`;
* :class:`SearchConfig`: the index, the neighbour search and what is kept of it;
* :class:`OutputConfig`: where the run writes and which earlier run it builds on;
* :class:`RunnerConfig`: where it runs and with which libraries.

Words: ``root`` is the output root (``--output``: ``LATEST`` and ``runs/`` live there),
``run_dir`` the run's own directory ``ROOT/runs/<run_id>/``.

:meth:`RunConfig.manifest_settings` derives the settings recorded in ``manifest.json``
from the groups, in one place; their keys and order are part of the manifest's contract.
Plain library (no Beam graph code), so tests and tools can build a config without Beam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.catalog import CatalogInfo
from pipeline.http_fetch import FetchConfig
from pipeline.models.registry import ResolvedModel
from pipeline.publish import run_dir as run_dir_of
from pipeline.quality import PROFILES, Recipe


@dataclass(frozen=True)
class ModelConfig:
    """The run's model and how each worker runs it (the embed and decode stages).

    With precomputed vectors ``resolved`` describes the vectors (``external``) and
    ``batch_size`` and ``lanes`` are 0: nothing is embedded.
    """

    resolved: ResolvedModel
    batch_size: int  # images per model call
    threads: int  # inference threads per worker process
    lanes: int = 1  # model calls a worker process runs at once
    max_image_pixels: int = 50_000_000  # decompression-bomb guard before decoding


@dataclass(frozen=True)
class SearchConfig:
    """How the index is built and searched, and which neighbours are kept.

    ``partition_column`` and ``exclude_column`` are feature columns (a manifest column
    as carried into ``features/``; :meth:`CatalogInfo.manifest_column` gives the
    manifest's name back). Defaults are the command line's.
    """

    top_k: int  # neighbours kept per product
    search: str = "auto"  # "auto", "exact", "ivf" or "annoy"
    n_trees: int = 0  # Annoy trees (0: from the catalogue size)
    search_k: int = 0  # Annoy search_k (0: from n_trees and the candidates)
    seed: int = 42  # Annoy build, IVF training and the recall sample
    nlist: int = 0  # IVF lists (0: from the catalogue size)
    nprobe: int = 0  # IVF lists probed per product (0: chosen for recall_target)
    recall_target: float = 0.99  # recall@k the IVF settings aim at; runs below it warn
    pca_dim: int = 0  # search in a PCA space of this many dimensions (0: full vectors)
    quality: Recipe = PROFILES["fast"]  # per-catalogue post-processing of the search space
    min_similarity: float | None = None  # drop weaker neighbours
    duplicate_threshold: float | None = 0.97  # near-duplicate pairs at or above (None: none)
    partition_column: str | None = None  # neighbours only within the same value
    exclude_column: str | None = None  # never pair products sharing a value


@dataclass(frozen=True)
class OutputConfig:
    """Where this run writes, and the earlier run it builds on (the nightly chain)."""

    root: str  # the output root: LATEST and runs/ live here
    run_id: str  # the run's directory name under ROOT/runs/
    started_at: float  # time.time() when the launcher fixed the run
    previous_run: str | None = None  # the last good run, whose unchanged embeddings are reused
    reuse: str = "no previous run"  # why (not) reusing, as recorded in the manifest
    features_only: bool = False  # stop after features/ and errors/ (no index, no neighbours)

    @property
    def run_dir(self) -> str:
        """This run's directory, ``ROOT/runs/<run_id>``."""
        return run_dir_of(self.root, self.run_id)


@dataclass(frozen=True)
class RunnerConfig:
    """Where the job runs and with which libraries (recorded for provenance)."""

    name: str = "DirectRunner"  # the Beam runner
    workers: int = 1  # worker processes sharing this machine
    versions: dict = field(default_factory=dict)  # library versions that shape the output
    # Build the Annoy forests in threads while the queries run (one-process local runner
    # only: the stage that waits must run in the process that started them).
    annoy_in_background: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Everything the graph needs, one group per concern (see the module docstring)."""

    catalog: CatalogInfo
    model: ModelConfig
    fetch: FetchConfig
    search: SearchConfig
    output: OutputConfig
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def manifest_settings(self) -> dict:
        """The run's settings as ``manifest.json`` records them (keys in this order)."""
        model, search, output = self.model.resolved, self.search, self.output
        return {
            "input": self.catalog.input,
            "output": output.root,
            "run_id": output.run_id,
            "run_dir": output.run_dir,
            "previous_run": output.previous_run,
            "reuse": output.reuse,
            "catalog_kind": self.catalog.kind,
            "embedding_column": self.catalog.embedding_column,
            "model": model.model_id,
            "model_name": model.name,
            "dim": model.dim,
            "input_size": model.input_size,
            "engine": model.engine,
            "batch_size": self.model.batch_size,
            "model_threads": self.model.threads,
            "model_lanes": self.model.lanes,
            "top_k": search.top_k,
            "seed": search.seed,
            "partition_by": self.catalog.manifest_column(search.partition_column),
            "exclude_same": self.catalog.manifest_column(search.exclude_column),
            "min_similarity": search.min_similarity,
            "duplicate_threshold": search.duplicate_threshold,
            "pca_dim": search.pca_dim or None,
            "quality": dict(search.quality.to_dict(),
                            similarity=search.quality.similarity_definition()),
            "recall_target": search.recall_target,
            "runner": self.runner.name,
            "workers": self.runner.workers,
            "versions": self.runner.versions,
        }
