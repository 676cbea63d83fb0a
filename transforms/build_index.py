"""Build the search index once all features are written — one index per partition.

The index needs every vector of a partition in one place, so after the feature
shards are final (their file names are this step's input) one worker reads the
ids and embeddings back from Parquet and splits them by partition (the whole
catalogue is one partition unless ``--partition_by`` names a manifest column).
Each partition's vectors (``.npy``, row-aligned, memory-mappable, no pickle) and
row → product id map (Parquet) are written there; the Annoy forests — the
expensive part — are then built in parallel, one per partition.

Layout: ``RUN_DIR/index/{annoy.ann, vectors.npy, ids.parquet, meta.json}`` for a
whole-catalogue index; with partitions, the same files under
``RUN_DIR/index/<partition-slug>/`` plus ``RUN_DIR/index/partitions.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import threading
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import files, similarity_search
from pipeline.features import MixedModelsError, read_feature_matrix
from pipeline.index_description import IndexDescription
from pipeline.run_config import SearchConfig
from pipeline.run_layout import (
    ANNOY_FILE,
    IDS_FILE,
    INDEX_DIR,
    META_FILE,
    PARTITIONS_FILE,
    PCA_COMPONENTS_FILE,
    PCA_MEAN_FILE,
    VECTORS_FILE,
)
from transforms.search_space import to_search_space

# Rows sampled to fit the PCA: plenty for a 1280 x 1280 covariance, bounded memory.
PCA_FIT_ROWS = 100_000


def fit_pca(vectors: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-``dim`` principal axes ([D], [D, dim]) of the run's own vectors."""
    rng = np.random.default_rng(seed)
    sample = vectors if len(vectors) <= PCA_FIT_ROWS else vectors[
        np.sort(rng.choice(len(vectors), PCA_FIT_ROWS, replace=False))]
    mean = sample.mean(axis=0, dtype=np.float64)
    centered = sample.astype(np.float64) - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered)
    top = eigenvectors[:, np.argsort(eigenvalues)[::-1][:dim]]
    # Fix each axis' sign so the projection is reproducible run to run.
    top *= np.where(top[np.abs(top).argmax(axis=0), np.arange(dim)] < 0, -1.0, 1.0)
    return mean.astype(np.float32), top.astype(np.float32)


def project(vectors: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Vectors in the PCA space, L2-normalised again (cosine stays the similarity)."""
    reduced = (vectors - mean) @ components
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return (reduced / np.maximum(norms, 1e-12)).astype(np.float32)


def partition_slug(value) -> str:
    """A directory name for a partition value: readable, unique, filesystem-safe."""
    text = "" if value is None else str(value)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40].strip("._") or "none"
    return f"{readable}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def _max_group(keys: list) -> int:
    """Largest number of rows sharing one non-null key (1 when keys are unique or None)."""
    counts: dict = {}
    for key in keys:
        if key is not None and key != "":
            counts[key] = counts.get(key, 0) + 1
    return max(counts.values(), default=1)


class SplitPartitionsFn(beam.DoFn):
    """All feature shard paths → per-partition vectors and id maps; yields one
    :class:`IndexDescription` each.

    Reads from ``search`` the partition and exclusion columns, the PCA size and the
    quality recipe (the search space is fixed here, before any index is built).
    """

    def __init__(self, run_dir: str, model_id: str, search: SearchConfig):
        self._run_dir = run_dir
        self._quality = search.quality
        self._model_id = model_id
        self._partition_column = search.partition_column
        self._exclude_column = search.exclude_column
        self._pca_dim = search.pca_dim

    def process(self, _, feature_paths):
        started = time.time()
        extra = [c for c in (self._partition_column, self._exclude_column) if c]
        matrix = read_feature_matrix(sorted(feature_paths), extra)
        index_root = files.join(self._run_dir, INDEX_DIR)
        if matrix.count == 0:
            yield self._write_partition(index_root, None, [], np.zeros((0, 0), np.float32),
                                        [], started)
            return
        if matrix.model_id != self._model_id:
            raise MixedModelsError(
                f"features come from {matrix.model_id}; this run's model is "
                f"{self._model_id} — one index needs one model")
        ids, vectors = matrix.product_ids, matrix.vectors
        if 0 < self._pca_dim < vectors.shape[1]:
            # Search in a smaller space fitted on this run's vectors; features/ keep
            # the full vectors.
            mean, components = fit_pca(vectors, self._pca_dim)
            for name, array in ((PCA_MEAN_FILE, mean), (PCA_COMPONENTS_FILE, components)):
                with files.staged_output(files.join(index_root, name)) as staged:
                    np.save(staged, array, allow_pickle=False)
            vectors = project(vectors, mean, components)
        # The quality recipe's search space (whitening, DBA), fitted on this run's vectors.
        vectors = to_search_space(vectors, self._quality, index_root)
        partitions = matrix.columns.get(self._partition_column, [None] * len(ids))
        excludes = matrix.columns.get(self._exclude_column, [None] * len(ids))
        groups: dict = {}
        for i, key in enumerate(partitions):  # rows are sorted by product id already
            groups.setdefault("" if key is None else str(key), []).append(i)
        descriptions = []
        for value in sorted(groups):
            rows = groups[value]
            directory = (files.join(index_root, partition_slug(value))
                         if self._partition_column else index_root)
            whole = len(rows) == len(ids)  # one partition: no copy of a matrix of millions
            descriptions.append(self._write_partition(
                directory, value if self._partition_column else None,
                ids if whole else [ids[i] for i in rows],
                vectors if whole else vectors[rows],
                excludes if whole else [excludes[i] for i in rows], started))
        if self._partition_column:
            files.write_json(files.join(index_root, PARTITIONS_FILE), {
                "partition_by": self._partition_column,
                "partitions": [{"value": d.partition, "dir": os.path.basename(
                    d.index_dir.rstrip("/")), "count": d.count} for d in descriptions]})
        yield from descriptions

    def _write_partition(self, directory, value, ids, vectors, excludes,
                         started) -> IndexDescription:
        with files.staged_output(files.join(directory, VECTORS_FILE)) as staged:
            similarity_search.save_vectors(staged, vectors)
        columns = {"row": pa.array(np.arange(len(ids), dtype=np.int64)),
                   "product_id": pa.array(ids, type=pa.string())}
        if self._exclude_column:
            columns["exclude_key"] = pa.array(
                [None if e is None else str(e) for e in excludes], type=pa.string())
        with files.staged_output(files.join(directory, IDS_FILE)) as staged:
            pq.write_table(pa.table(columns), staged)
        return IndexDescription(
            index_dir=directory,
            partition=value,
            count=len(ids),
            dim=int(vectors.shape[1]) if len(ids) else 0,
            model=self._model_id,
            max_exclude_group=_max_group(excludes) if self._exclude_column else 1,
            split_seconds=round(time.time() - started, 3),
        )


class BuildAnnoyFn(beam.DoFn):
    """One partition's vectors → its Annoy forest and meta.json; yields the description.

    Reads from ``search`` the search mode, Annoy's n_trees/search_k, top_k and the seed.
    """

    def __init__(self, search: SearchConfig):
        self._top_k = search.top_k
        self._search = search.search
        self._n_trees = search.n_trees
        self._search_k = search.search_k
        self._seed = search.seed

    def plan(self, part: IndexDescription) -> IndexDescription:
        """The partition's search settings (no index built yet): what the queries need."""
        n, dim = part.count, part.dim
        search = similarity_search.choose_search(
            n, self._search, similarity_search.exact_max_n_for(dim) if dim else
            similarity_search.EXACT_MAX_N)
        n_trees = self._n_trees or (similarity_search.default_n_trees(n, dim) if n else 0)
        query_k = self._top_k + part.max_exclude_group - 1
        candidates = similarity_search.default_candidates(query_k)
        search_k = self._search_k or similarity_search.default_search_k(max(n_trees, 1),
                                                                        candidates)
        return dataclasses.replace(
            part, search=search, n_trees=int(n_trees), search_k=int(search_k),
            candidates=int(candidates), query_k=int(query_k), seed=int(self._seed),
            files={"annoy": ANNOY_FILE if n else None, "vectors": VECTORS_FILE,
                   "ids": IDS_FILE})

    def process(self, part: IndexDescription):
        """Build the forest and write meta.json; yields the partition's description."""
        yield self.build(part)

    def build(self, part: IndexDescription) -> IndexDescription:
        """The work of :meth:`process`, callable from a background thread."""
        started = time.time()
        planned = part if part.search is not None else self.plan(part)
        n = planned.count
        if n:
            with tempfile.TemporaryDirectory(prefix="similarity-annoy-") as local, \
                    files.staged_output(files.join(part.index_dir, ANNOY_FILE)) as staged:
                vectors = similarity_search.load_vectors(
                    files.local_path(files.join(part.index_dir, VECTORS_FILE), local),
                    mmap=True)
                # Only annoy search waits for the forest with nothing else to run;
                # next to exact/IVF queries the split build made runs slower (README,
                # "Neighbours at scale"), so there the forest is one single-threaded build.
                similarity_search.build_annoy_index(vectors, staged, planned.n_trees,
                                                    self._seed,
                                                    parallel=planned.search == "annoy")
                del vectors
        annoy_seconds = time.time() - started
        built = dataclasses.replace(
            planned,
            metric="angular",
            seed=int(self._seed),
            count=int(n),
            top_k=int(self._top_k),
            files=dict(planned.files or {}, **({"ivf_centroids": "ivf_centroids.npy"}
                                               if planned.search == "ivf" else {})),
            build_seconds=round(part.split_seconds + annoy_seconds, 3),
            annoy_build_seconds=round(annoy_seconds, 3),
        )
        files.write_json(files.join(part.index_dir, META_FILE), built.as_meta())
        return built


class _BackgroundBuild:
    """One Annoy build running in a thread of this process; its description or its error."""

    def __init__(self, build: BuildAnnoyFn, part: IndexDescription):
        self.description: IndexDescription | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(build, part),
                                        name="annoy-build", daemon=True)
        self._thread.start()

    def _run(self, build: BuildAnnoyFn, part: IndexDescription) -> None:
        try:
            self.description = build.build(part)
        except BaseException as exc:  # re-raised in the stage that waits for it
            self.error = exc

    def wait(self) -> IndexDescription:
        """Block until the build ends; its description, or its exception raised here."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.description is not None
        return self.description

    def join(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: until it ends) without raising its error."""
        self._thread.join(timeout)


# Builds started by StartAnnoyFn in this process, by index directory. Only used on
# Beam's in-memory DirectRunner, where the stage that waits runs in the same process.
_BACKGROUND: dict[str, _BackgroundBuild] = {}
_BACKGROUND_LOCK = threading.Lock()


def settle_background_builds(run_dir: str, timeout: float | None = None) -> None:
    """Wait for (and forget) the background builds of a run that stopped before collecting them.

    Called by the launcher when a run fails: a build still running would write
    into the run's index directory after its temporaries were cleaned up, and a
    failed one would keep its vectors memory-mapped through its traceback.
    ``timeout`` bounds the wait (an interrupted run does not wait out a long
    build; the on-disk build's child dies with the process).
    """
    prefix = run_dir.rstrip("/") + "/"
    with _BACKGROUND_LOCK:
        mine = [key for key in _BACKGROUND if key.startswith(prefix) or key == run_dir]
        builds = [_BACKGROUND.pop(key) for key in mine]
    deadline = None if timeout is None else time.monotonic() + timeout
    for build in builds:
        build.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


class StartAnnoyFn(beam.DoFn):
    """Start a partition's Annoy build in a background thread; yields its plan at once.

    Beam's local runner runs one stage at a time, so a forest built inside its
    stage adds its whole build time to the run even though no neighbour query
    needs it (on a distributed runner the build is a parallel branch). Annoy
    releases the GIL while it builds, so a thread lets the build use the
    machine's other core while the queries run; :class:`AwaitAnnoyFn` collects it.
    """

    def __init__(self, build: BuildAnnoyFn):
        self._build = build

    def process(self, part: IndexDescription):
        with _BACKGROUND_LOCK:
            _BACKGROUND[part.index_dir] = _BackgroundBuild(self._build, part)
        yield part


class AwaitAnnoyFn(beam.DoFn):
    """Wait for a background build (started in this process) and yield its description.

    Side inputs (the neighbour shards) make this stage run after the queries.
    A build this process did not start (a worker that did not run the start)
    is run here, so the description is never missing.
    """

    def __init__(self, build: BuildAnnoyFn):
        self._build = build

    def process(self, part: IndexDescription, *_after):
        with _BACKGROUND_LOCK:
            running = _BACKGROUND.pop(part.index_dir, None)
        yield running.wait() if running is not None else self._build.build(part)


class BuildIndex(beam.PTransform):
    """Feature file names (after the write is final) → one :class:`IndexDescription` per
    partition index.

    ``run_dir`` is the run's directory (the index goes to ``run_dir/index/``),
    ``model_id`` the run's model (features of another model are refused), ``search``
    the run's search settings; ``background`` builds the Annoy forests in threads
    (Beam's in-memory local runner only, see :meth:`expand`).
    """

    def __init__(self, run_dir: str, model_id: str, search: SearchConfig,
                 background: bool = False):
        super().__init__()
        self._background = background
        self._split = SplitPartitionsFn(run_dir, model_id, search)
        self._build = BuildAnnoyFn(search)
        self._partitioned = search.partition_column is not None

    def expand(self, feature_paths):
        """Returns ``{"planned": …, "built": …}``: the partitions' search settings as soon as
        their vectors are written (the neighbour queries start from these), and the
        descriptions after each Annoy forest is built (the artefact for new-image look-ups,
        off the neighbours' critical path unless the search itself is Annoy). With
        ``background`` (Beam's in-memory local runner), "built" is None: the forests build
        in threads started in "planned", and :meth:`await_built` collects them."""
        # Once, with every shard name as a side input: the split starts when the
        # feature files are final.
        parts = (feature_paths.pipeline
                 | "Once" >> beam.Impulse()
                 | "SplitPartitions" >> beam.ParDo(self._split,
                                                   beam.pvalue.AsList(feature_paths)))
        if self._partitioned:  # one Annoy build per partition, spread over the workers
            parts = parts | "SpreadPartitions" >> beam.Reshuffle()
        planned = parts | "PlanSearch" >> beam.Map(self._build.plan)
        if self._background:
            started = planned | "StartAnnoy" >> beam.ParDo(StartAnnoyFn(self._build))
            return {"planned": started, "built": None}
        return {"planned": planned, "built": planned | "BuildAnnoy" >> beam.ParDo(self._build)}

    def await_built(self, planned, *after):
        """With ``background``: the descriptions once the builds end, waiting for ``after``."""
        return planned | "AwaitAnnoy" >> beam.ParDo(
            AwaitAnnoyFn(self._build), *(beam.pvalue.AsList(pcoll) for pcoll in after))
