"""Look up new images against a published run: the "search by photo" API.

:class:`SimilarityIndex` opens a run (``ROOT/LATEST``, ``ROOT`` or a run
directory), memory-maps its index (``index/vectors.npy``, the Annoy forest,
``ids.parquet``), loads the run's own model with the run's engine and
preprocessing, and answers:

* ``query_image(image, k)`` — a path, bytes, a PIL image or a uint8 array;
* ``query_vector(vector, k)`` — an embedding of the run's model;
* ``neighbors(product_id)`` — the run's precomputed list, read from the one
  ``neighbors/`` shard that holds it;
* ``info`` — model id, input size, dim, count, search method.

The search is the run's: chosen from each index directory's ``meta.json``
(``exact``: blocked dot products over ``vectors.npy``; ``annoy``: Annoy
candidates re-ranked by exact cosine; any other method: exact search over
``vectors.npy``, which is always correct), in the run's PCA space when it has
one, per partition when it was partitioned. The run defines the catalogue: a
product removed by a later run is still returned by an older run you open, and
never by the newer one.

This module sits at the bottom layer (numpy, Annoy, pyarrow, the model
handler); it imports Apache Beam only when a URL needs a non-local path
resolved (the decoder, ``pipeline/image_decode.py``, is Beam-free).
"""

from __future__ import annotations

import bisect
import io
import json
import os
import threading
from dataclasses import dataclass

import numpy as np

from pipeline import similarity_search
from pipeline.index_description import IndexDescription
from pipeline.models.handler import ModelHandler, resolve
from pipeline.models.sources import model_source
from pipeline.models.specs import ModelLoadError, ResolvedModel
from pipeline.run_layout import (
    IDS_FILE,
    INDEX_DIR,
    LATEST,
    MANIFEST_FILE,
    META_FILE,
    NEIGHBORS_DIR,
    PARTITIONS_FILE,
    PCA_COMPONENTS_FILE,
    PCA_MEAN_FILE,
    SPACE_FILE,
    VECTORS_FILE,
    WHITENING_MEAN_FILE,
    WHITENING_PROJECTION_FILE,
)

DEFAULT_K = 20


class RunError(ValueError):
    """The run cannot be queried (missing, incomplete, no index); one sentence."""


class ModelMismatchError(RunError):
    """The model given is not the model the run was built with; one sentence."""


class QueryError(ValueError):
    """One image could not be looked up; ``reason`` is the pipeline's reason code."""

    def __init__(self, reason: str, message: str, stage: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stage = stage


@dataclass(frozen=True)
class IndexInfo:
    """What a run's index is: its model, sizes and search method."""

    run_dir: str
    model: str
    model_name: str
    engine: str
    input_size: int
    dim: int  # of the model's embeddings
    search_dim: int  # of the vectors searched (the PCA space when pca_dim is set)
    count: int
    search: str  # the method used ("exact", "annoy", …; "mixed" across partitions)
    partitions: tuple  # partition values, () when the run is not partitioned
    pca_dim: int | None
    quality: str = "fast"  # the run's --quality profile (manifest.json "quality")


def resolve_run_dir(path: str) -> str:
    """The run directory meant by ``path``: a run dir, ``ROOT/LATEST`` or ``ROOT``.

    Local paths are resolved without Beam; object-store paths go through
    ``pipeline.publish.resolve_run``.
    """
    path = os.fspath(path)
    if "://" in path:
        from pipeline import publish

        return publish.resolve_run(path)
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return os.path.realpath(path)
    latest = path if os.path.basename(path.rstrip("/")) == LATEST else os.path.join(path, LATEST)
    if os.path.isfile(latest):  # the object-store form: one line "runs/<run_id>"
        with open(latest, encoding="utf-8") as handle:
            return os.path.realpath(os.path.join(os.path.dirname(latest), handle.read().strip()))
    if os.path.isdir(latest):
        return os.path.realpath(latest)
    return path


def _read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _local(run_dir: str) -> str:
    """A local copy of a remote run's index/ and neighbors/ (the files are memory-mapped)."""
    if "://" not in run_dir:
        return run_dir
    import hashlib
    import tempfile

    from apache_beam.io.filesystems import FileSystems

    from pipeline import files

    cache = os.path.join(tempfile.gettempdir(), "similarity-run-" + hashlib.sha1(
        run_dir.encode()).hexdigest()[:16])
    for sub in (INDEX_DIR, NEIGHBORS_DIR):
        for match in FileSystems.match([files.join(run_dir, sub, "**")])[0].metadata_list:
            relative = match.path[len(run_dir.rstrip("/")) + 1:]
            target = os.path.join(cache, os.path.dirname(relative))
            if not os.path.exists(os.path.join(cache, relative)):
                files.copy_to_local(match.path, target)
    files.copy_to_local(files.join(run_dir, MANIFEST_FILE), cache)
    return cache


class _Partition:
    """One index directory: its vectors (memory-mapped), ids, Annoy forest and settings."""

    def __init__(self, directory: str, meta: IndexDescription):
        import pyarrow.parquet as pq

        self.directory = directory
        self.meta = meta
        self.value = meta.partition
        self.count = int(meta.count)
        self.search = "exact" if meta.search is None else meta.search
        self.vectors = (similarity_search.load_vectors(os.path.join(directory, VECTORS_FILE))
                        if self.count else np.zeros((0, int(meta.dim or 0)), np.float32))
        table = pq.ParquetFile(os.path.join(directory, IDS_FILE)).read(columns=["product_id"])
        self.product_ids = table.column("product_id").to_pylist()
        if len(self.product_ids) != self.count or len(self.vectors) != self.count:
            raise RunError(f"{directory}: meta.json says {self.count} products but ids.parquet "
                           f"has {len(self.product_ids)} and vectors.npy {len(self.vectors)}")
        annoy_file = (meta.files or {}).get("annoy")
        self.annoy = None
        if self.search == "annoy" and annoy_file and self.count:
            self.annoy = similarity_search.open_annoy_index(os.path.join(directory, annoy_file),
                                                            self.vectors.shape[1])

    def row_of(self, product_id: str) -> int | None:
        """The row of ``product_id`` (ids are sorted by product id), or None."""
        i = bisect.bisect_left(self.product_ids, product_id)
        return i if i < self.count and self.product_ids[i] == product_id else None

    def search_top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query by the partition's own method (exact when unknown)."""
        if self.annoy is not None:
            return annoy_vector_top_k(self.annoy, self.vectors, queries, k,
                                      self.meta.candidates, self.meta.search_k)
        return similarity_search.exact_top_k(queries, self.vectors, k)


def annoy_vector_top_k(index, vectors: np.ndarray, queries: np.ndarray, k: int,
                       candidates: int | None = None, search_k: int | None = None):
    """Top-``k`` rows of ``vectors`` for new query vectors: Annoy candidates, exact re-rank.

    The new-vector counterpart of ``similarity_search.annoy_top_k`` (which
    queries items already in the index): Annoy proposes ``candidates``
    (``get_nns_by_vector``), they are re-ranked by exact cosine on the stored
    vectors and ordered by (similarity desc, row asc) like ``exact_top_k``; a
    query with fewer candidates than ``k'`` is answered exactly.
    """
    queries = np.asarray(queries, dtype=np.float32)
    n = len(vectors)
    k_out = max(min(k, n), 0)
    candidates = max(int(candidates or similarity_search.default_candidates(k_out)), k_out)
    if not search_k:
        search_k = similarity_search.default_search_k(index.get_n_trees(), candidates)
    out_idx = np.empty((len(queries), k_out), dtype=np.int64)
    out_sim = np.empty((len(queries), k_out), dtype=np.float32)
    if len(queries) == 0 or k_out == 0:
        return out_idx, out_sim
    for i, query in enumerate(queries):
        found = np.asarray(index.get_nns_by_vector(query.tolist(), candidates, int(search_k)),
                           dtype=np.int64)
        if len(found) < k_out:
            idx, sim = similarity_search.exact_top_k(query[None], vectors, k_out)
            out_idx[i], out_sim[i] = idx[0], sim[0]
            continue
        sims = np.asarray(vectors[found], dtype=np.float32) @ query
        order = np.lexsort((found, -sims))[:k_out]
        out_idx[i], out_sim[i] = found[order], sims[order]
    return out_idx, out_sim


class SimilarityIndex:
    """A published run opened for look-ups; safe to share between threads.

    Reads are lock-free (memory-mapped numpy, Annoy releases the GIL and its
    reads are thread-safe); model calls run on a pool of TFLite interpreters,
    one call per interpreter at a time (``lanes``), or under a lock for the
    SavedModel engine.
    """

    def __init__(self, run_dir: str, manifest: dict, partitions: list[_Partition],
                 pca: tuple[np.ndarray, np.ndarray] | None, *, model: ResolvedModel | None,
                 threads: int, lanes: int, fetch_config=None, max_image_pixels: int = 50_000_000):
        self.run_dir = run_dir
        self.manifest = manifest
        self._partitions = partitions
        self._by_value = {("" if p.value is None else str(p.value)): p for p in partitions}
        self._pca = pca
        self._model_info = model
        self._threads, self._lanes = threads, lanes
        self._engine = None
        self._handler: ModelHandler | None = None
        self._engine_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._fetch_config = fetch_config
        self._fetcher = None
        self._pool = None
        self._max_image_pixels = max_image_pixels
        searches = sorted({p.search for p in partitions}) or ["exact"]
        self.info = IndexInfo(
            run_dir=run_dir, model=manifest.get("model"),
            model_name=manifest.get("model_name") or "",
            engine=manifest.get("engine") or "", input_size=int(manifest.get("input_size") or 0),
            dim=int(manifest.get("dim") or 0),
            search_dim=int(partitions[0].vectors.shape[1]) if partitions else 0,
            count=sum(p.count for p in partitions),
            search=searches[0] if len(searches) == 1 else "mixed",
            partitions=tuple(p.value for p in partitions if p.value is not None),
            pca_dim=manifest.get("pca_dim"),
            quality=(manifest.get("quality") or {}).get("profile", "fast"))
        self._space = None  # (space.json, whitening mean, projection) when post-processed

    # --- opening ------------------------------------------------------------

    @classmethod
    def open(cls, run: str, model: str | None = None, load_model_now: bool = True,
             cache_dir: str | None = None, threads: int = 0, lanes: int = 0,
             fetch_config=None, max_image_pixels: int = 50_000_000) -> "SimilarityIndex":
        """Open a published run for look-ups (``ROOT``, ``ROOT/LATEST`` or a run directory).

        Why: one object a CLI, a batch job or a web service loads once and
        queries many times. The run's model is resolved by the name and engine
        in its ``manifest.json`` and must have the run's model id and input
        size; ``model`` (a name, handle or directory) may be given to use a
        local copy, and a different model is refused (:class:`ModelMismatchError`).
        ``load_model_now=False`` opens only the index (``query_vector`` and
        ``neighbors`` work; the model loads on the first ``query_image``).
        ``threads`` / ``lanes`` size the model (0: every core, one
        single-threaded interpreter per core). Raises :class:`RunError` with one
        sentence for a missing or incomplete run or one without an index.
        """
        run_dir = resolve_run_dir(run)
        local = _local(run_dir)
        manifest_path = os.path.join(local, MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            raise RunError(f"{run} is not a published run (no {MANIFEST_FILE}; give ROOT, "
                           f"ROOT/LATEST or ROOT/runs/<run_id>)")
        manifest = _read_json(manifest_path)
        index_root = os.path.join(local, INDEX_DIR)
        if not manifest.get("index") or not os.path.isdir(index_root):
            raise RunError(f"{run_dir} was built without an index (--features_only); rerun the "
                           f"pipeline without it to look images up")
        directories = [index_root]
        partitions_path = os.path.join(index_root, PARTITIONS_FILE)
        if os.path.isfile(partitions_path):
            directories = [os.path.join(index_root, p["dir"])
                           for p in _read_json(partitions_path)["partitions"]]
        parts = []
        for directory in directories:
            meta_path = os.path.join(directory, META_FILE)
            if not os.path.isfile(meta_path):
                raise RunError(f"{directory} has no {META_FILE}: the run's index is incomplete")
            meta = IndexDescription.from_meta(_read_json(meta_path), directory)
            if meta.model != manifest.get("model"):
                raise RunError(f"{directory} was built with {meta.model}, the run with "
                               f"{manifest.get('model')}")
            parts.append(_Partition(directory, meta))
        pca = None
        if os.path.isfile(os.path.join(index_root, PCA_MEAN_FILE)):
            pca = (np.load(os.path.join(index_root, PCA_MEAN_FILE), allow_pickle=False),
                   np.load(os.path.join(index_root, PCA_COMPONENTS_FILE), allow_pickle=False))
        index = cls(run_dir, manifest, parts, pca, model=None, threads=threads, lanes=lanes,
                    fetch_config=fetch_config, max_image_pixels=max_image_pixels)
        space_path = os.path.join(index_root, SPACE_FILE)
        if os.path.isfile(space_path):
            space = _read_json(space_path)
            whitening = None
            if space.get("whitening"):
                whitening = (
                    np.load(os.path.join(index_root, WHITENING_MEAN_FILE), allow_pickle=False),
                    np.load(os.path.join(index_root, WHITENING_PROJECTION_FILE),
                            allow_pickle=False))
            index._space = (space, whitening)
        index._requested_model = model
        index._cache_dir = cache_dir
        if load_model_now:
            index.model()
            # The decoder's module imports Pillow and its plugins: pay it here, not in
            # the first request.
            import pipeline.image_decode  # noqa: F401
        return index

    def model(self) -> ResolvedModel:
        """The run's model, resolved (and its engine loaded) on first use; checked against the run."""
        with self._engine_lock:
            if self._engine is None:
                self._model_info = resolve_run_model(self.manifest, self._requested_model,
                                                     self._cache_dir)
                # 0 threads: every core, one single-threaded interpreter per core.
                self._handler = ModelHandler(self._model_info,
                                             self._threads or os.cpu_count() or 1, self._lanes)
                self._engine = self._handler.load_model()
            return self._model_info

    # --- look-ups -----------------------------------------------------------

    def query_vector(self, vector, k: int = DEFAULT_K, partition=None,
                     min_similarity: float | None = None) -> list[dict]:
        """The ``k`` most similar products of the run to one embedding of the run's model.

        The vector is L2-normalised (and projected into the run's PCA space when
        it has one), then searched by the run's method. ``partition`` limits the
        search to one ``--partition_by`` value; without it every partition is
        searched and the lists merged. Returns ``[{"product_id", "similarity"}]``,
        best first, ties by product id, similarities rounded like the run's.
        """
        return self.query_vectors(np.asarray(vector, dtype=np.float32)[None], k, partition,
                                  min_similarity)[0]

    def query_vectors(self, vectors, k: int = DEFAULT_K, partition=None,
                      min_similarity: float | None = None) -> list[list[dict]]:
        """``query_vector`` for a batch of embeddings ``[B, dim]``: one list per row."""
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise ValueError(f"vectors must have shape [B, {self.info.dim}] (the run's "
                             f"{self.info.model}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = _normalize(queries)
        if self._pca is not None:
            mean, components = self._pca
            queries = _normalize((queries - mean) @ components)
        parts = self._partitions
        if partition is not None:
            key = str(partition)
            if key not in self._by_value:
                raise ValueError(f"partition {partition!r} is not in this run (it has "
                                 f"{sorted(self._by_value)[:20]})")
            parts = [self._by_value[key]]
        if self._space is not None:
            queries = self._to_search_space(queries)
        merged = [[] for _ in range(len(queries))]
        for part in parts:
            if not part.count:
                continue
            idx, sims = part.search_top_k(queries, k)
            for i in range(len(queries)):
                merged[i].extend((float(s), part.product_ids[j]) for j, s in zip(idx[i], sims[i]))
        results = []
        for found in merged:
            found.sort(key=lambda pair: (-pair[0], pair[1]))
            out = []
            for similarity, product_id in found[:k]:
                similarity = round(similarity, 4)
                if min_similarity is not None and similarity < min_similarity:
                    break
                out.append({"product_id": product_id, "similarity": similarity})
            results.append(out)
        return results

    def _to_search_space(self, queries: np.ndarray) -> np.ndarray:
        """New vectors through the run's recipe: its stored whitening, then the query-side
        counterpart of its DBA (each query averaged with its ``dba_k`` nearest search
        vectors, weights similarity ** alpha), so they are compared like the catalogue's."""
        from pipeline import postprocess

        space, whitening = self._space
        if whitening is not None:
            queries = postprocess.apply_whitening(queries, postprocess.Whitening(*whitening))
        recipe = space.get("recipe") or {}
        k, alpha = int(recipe.get("dba_k") or 0), float(recipe.get("dba_alpha") or 0.0)
        if not k:
            return queries
        found = [p.search_top_k(queries, k) + (n, p)
                 for n, p in enumerate(self._partitions) if p.count]
        expanded = queries.astype(np.float64).copy()
        for i in range(len(queries)):
            pairs = sorted(((float(s), n, j, p) for idx, sims, n, p in found
                            for j, s in zip(idx[i], sims[i])), key=lambda t: (-t[0], t[1], t[2]))
            for similarity, _, j, part in pairs[:k]:
                expanded[i] += max(similarity, 0.0) ** alpha * part.vectors[j].astype(np.float64)
        return postprocess.unit_rows(expanded)

    def embed(self, images: list) -> np.ndarray:
        """Embeddings ``[B, dim]`` of images (paths, URLs, bytes, PIL images, uint8 arrays).

        Each image is read, decoded and letterboxed exactly as the pipeline
        does (same reader, SSRF guard, decoder and input size) and run through
        the run's model and engine. Raises :class:`QueryError` for the first
        image that fails, with the pipeline's stage and reason code.
        """
        pixels = [self._pixels(image) for image in images]
        self.model()
        if self._engine.name == "tflite":  # its lanes serialise calls per interpreter
            raw = self._embed_on_lanes(pixels)
        else:
            with self._call_lock:
                raw = self._handler.run_inference(pixels, self._engine)
        vectors = np.asarray(raw, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.isfinite(vectors)) or np.any(norms <= 1e-12):
            raise QueryError("bad_vector", "the model returned a zero or non-finite vector "
                             "for this image", "embed")
        return vectors / norms[:, None]

    def _embed_on_lanes(self, pixels: list) -> np.ndarray:
        """Several images are cut into the engine's preferred batches, run on all its
        lanes at once (one single-threaded interpreter per core)."""
        handler = self._handler
        step = handler.batch_size
        if len(pixels) <= step or self._engine.lanes < 2:
            return handler.run_inference(pixels, self._engine)
        with self._engine_lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self._engine.lanes,
                                                thread_name_prefix="query-lane")
        chunks = [pixels[i:i + step] for i in range(0, len(pixels), step)]
        return np.concatenate(list(self._pool.map(
            lambda chunk: handler.run_inference(chunk, self._engine), chunks)))

    def query_image(self, image, k: int = DEFAULT_K, partition=None,
                    min_similarity: float | None = None) -> list[dict]:
        """The ``k`` most similar products of the run to one new image (see :meth:`embed`)."""
        return self.query_vector(self.embed([image])[0], k, partition, min_similarity)

    def query_images(self, images: list, k: int = DEFAULT_K, partition=None,
                     min_similarity: float | None = None) -> list[list[dict]]:
        """``query_image`` for several images at once (one model call, one search)."""
        return self.query_vectors(self.embed(images), k, partition, min_similarity)

    def neighbors(self, product_id: str) -> list[dict] | None:
        """The run's precomputed neighbour list of ``product_id``, or None if not in the run.

        Why: a service needs one product's list without loading every shard.
        The shard is found from the row layout (partitions by value, then fixed
        row ranges of the sorted ids; see ``transforms/query_neighbors.py``) and
        only that file is scanned; if the layout ever differs, every shard is
        scanned line by line instead, still without holding more than one line.
        """
        product_id = str(product_id)
        position = None
        offset = 0
        ordered = sorted(self._partitions,
                         key=lambda p: "" if p.value is None else str(p.value))
        for part in ordered:
            row = part.row_of(product_id)
            if row is not None:
                position = (offset, part, row)
                break
            offset += -(-part.count // self._shard_rows()) if part.count else 0
        if position is None:
            return None
        shard_offset, part, row = position
        shards = self._neighbor_shards()
        guess = shard_offset + row // self._shard_rows()
        order = ([shards[guess]] if guess < len(shards) else []) + shards
        for path in order:
            found = _scan_shard(path, product_id)
            if found is not None:
                return found
        return None

    def _shard_rows(self) -> int:
        # transforms.query_neighbors.rows_per_shard, without importing Beam.
        import math

        count = self.info.count
        return max(1000, min(20_000, math.ceil(count / 16))) if count else 1

    def _neighbor_shards(self) -> list[str]:
        directory = os.path.join(_local(self.run_dir), NEIGHBORS_DIR)
        return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                      if name.endswith(".jsonl"))

    # --- reading images -----------------------------------------------------

    def _pixels(self, image) -> np.ndarray:
        from pipeline.image_decode import DecodeError, decode_image

        size = self.model().input_size
        try:
            if isinstance(image, np.ndarray):
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
                    raise QueryError("unsupported_mode", f"an array image must be uint8 "
                                     f"[H, W, 3], got {image.dtype} {image.shape}", "decode")
                from PIL import Image

                image = Image.fromarray(image[:, :, :3], "RGB")
            if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")  # lossless: the decoder's own path from here
                data = buffer.getvalue()
            elif isinstance(image, (bytes, bytearray, memoryview)):
                data = bytes(image)
            elif isinstance(image, (str, os.PathLike)):
                data = self._read(os.fspath(image))
            else:
                raise QueryError("unsupported_input", f"cannot read an image from a "
                                 f"{type(image).__name__}", "read")
            return decode_image(data, size, self._max_image_pixels).pixels
        except DecodeError as exc:
            raise QueryError(exc.reason, exc.message, "decode") from exc

    def _read(self, location: str) -> bytes:
        from pipeline.http_fetch import FetchConfig, HttpFetcher
        from pipeline.row_errors import RowError

        scheme = location.split("://", 1)[0].lower() if "://" in location else ""
        try:
            if scheme in ("http", "https"):
                with self._engine_lock:
                    if self._fetcher is None:
                        self._fetcher = HttpFetcher(self._fetch_config or FetchConfig())
                return self._fetcher.fetch(location).data
            max_bytes = (self._fetch_config.max_bytes if self._fetch_config is not None
                         else 20 * 1024 * 1024)
            if scheme:  # gs://, s3://…: the pipeline's reader (imports Beam's filesystems)
                from pipeline.file_bytes import read_file_bytes

                return read_file_bytes(location, max_bytes)
            return _read_local(location, max_bytes)
        except RowError as exc:
            raise QueryError(exc.reason, exc.message, "read") from exc

    def close(self) -> None:
        """Close pooled HTTP connections (the memory maps close with the object)."""
        if self._fetcher is not None:
            self._fetcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _read_local(path: str, max_bytes: int) -> bytes:
    """A local file's bytes, with the pipeline's reason codes (missing_file, unreadable, too_large)."""
    from pipeline.row_errors import RowError

    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise RowError("too_large", f"{path} is larger than the {max_bytes:,}-byte limit")
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise RowError("missing_file", f"{path} does not exist") from None
    except IsADirectoryError:
        raise RowError("unreadable", f"{path} is a directory, not an image file") from None
    except PermissionError:
        raise RowError("unreadable", f"no permission to read {path}") from None
    except OSError as exc:
        raise RowError("unreadable", f"could not read {path}: {exc}") from None


def _scan_shard(path: str, product_id: str) -> list[dict] | None:
    """The neighbour list of ``product_id`` in one shard, reading line by line.

    Shards are written by orjson (compact, ``product_id`` first), so only the
    line that starts with the id is parsed.
    """
    import orjson

    prefix = b'{"product_id":' + orjson.dumps(product_id) + b","
    with open(path, "rb") as handle:
        for line in handle:
            if line.startswith(prefix):
                return orjson.loads(line)["neighbors"]
    return None


def _normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms <= 1e-12):
        raise ValueError("query vectors must be finite and non-zero")
    return (vectors / norms).astype(np.float32)


def resolve_run_model(manifest: dict, requested: str | None = None,
                      cache_dir: str | None = None) -> ResolvedModel:
    """The run's model with the run's engine, refused with one sentence if it is another model.

    ``requested`` defaults to the run's ``model_name``. A registered offline
    model whose TFLite conversion was verified by an earlier run resolves from
    the cache without importing TensorFlow.
    """
    run_model = manifest.get("model")
    name = requested or manifest.get("model_name")
    if not name or not run_model:
        raise RunError("the run's manifest.json names no model; it cannot be queried")
    engine = manifest.get("engine") or "auto"
    if engine not in ("tflite", "savedmodel"):
        engine = "auto"
    try:
        resolved = resolve(model_source(name, cache_dir), engine)
    except ModelLoadError as exc:
        raise RunError(f"cannot load the run's model {name}: {exc}") from exc
    if resolved.model_id != run_model:
        raise ModelMismatchError(f"model mismatch: the run was built with {run_model}, "
                                 f"{name} is {resolved.model_id}; query with the run's model")
    input_size = manifest.get("input_size")
    if input_size and int(input_size) != resolved.input_size:
        raise ModelMismatchError(f"model mismatch: the run's images were {input_size} px, "
                                 f"{name} takes {resolved.input_size} px")
    if manifest.get("dim") and int(manifest["dim"]) != resolved.dim:
        raise ModelMismatchError(f"model mismatch: the run's vectors have {manifest['dim']} "
                                 f"dimensions, {name} gives {resolved.dim}")
    return resolved
