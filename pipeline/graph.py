"""The pipeline graph: catalogue → bytes → pixels → embeddings → features → index → neighbours.

Every transform is labelled so a run reads the same in the Beam UI of any
runner. Each stage that can fail has an ``errors`` output; all of them flow into
``errors/``, and ``manifest.json`` is written last, only if every input row is
accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam

from pipeline import files, progress, vector_blocks
from pipeline.models.registry import ResolvedModel
from pipeline.quality import PROFILES, Recipe
from transforms import count_rows
from transforms.build_index import BuildIndex
from transforms.decode import DecodeImageFn
from transforms.deduplicate import REMOVED, DeduplicateBlocks, DeduplicateProductIds
from transforms.embed import EmbedImages
from transforms.errors import ERRORS
from pipeline.http_fetch import FetchConfig
from transforms.progress_tick import count_as, count_failures
from transforms.duplicate_groups import WriteDuplicateGroups
from transforms.neighbor_shards import NEAR_DUPLICATES
from transforms.query_neighbors import QueryNeighbors
from transforms.read_bytes import ReadImageBytesFn
from pipeline.catalog import CatalogInfo
from transforms.read_catalog import ReadCatalog
from transforms import read_vectors
from transforms.reuse_previous import REUSED, ReadPreviousFeatures, SplitUnchangedFn
from transforms.validate_rows import SplitInvalidRowsFn
from transforms.write_features import WriteFeatures
from pipeline.features import features_schema
from transforms.write_manifest import WriteManifest
from pipeline.run_layout import ERRORS_DIR, ERRORS_PREFIX


@dataclass(frozen=True)
class RunConfig:
    """Everything the graph needs, fixed in the launcher before the run starts."""

    output: str
    catalog: CatalogInfo
    model: ResolvedModel
    top_k: int
    batch_size: int
    model_threads: int
    search: str
    n_trees: int
    search_k: int
    seed: int
    max_image_pixels: int
    fetch: FetchConfig
    started_at: float
    settings: dict  # written into manifest.json as is
    features_only: bool = False  # stop after features/ and errors/ (no index, no neighbours)
    previous_run: str | None = None  # the last good run, whose unchanged embeddings are reused
    partition_by: str | None = None  # neighbours only within the same value of this column
    exclude_same: str | None = None  # never pair products sharing a value of this column
    min_similarity: float | None = None  # drop weaker neighbours
    duplicate_threshold: float = 0.97  # near-duplicate groups link at this similarity
    pca_dim: int = 0  # search in a PCA space of this many dimensions (0: full vectors)
    model_lanes: int = 1  # model calls a worker process runs at once
    nlist: int = 0  # IVF lists (0: from the catalogue size)
    nprobe: int = 0  # IVF lists probed per product (0: chosen for recall_target)
    recall_target: float = 0.99  # recall@k the IVF settings aim at; runs below it warn
    quality: Recipe = PROFILES["fast"]  # per-catalogue post-processing of the search space
    # Build the Annoy forests in threads while the queries run (one-process local runner only:
    # the stage that waits must run in the process that started them).
    annoy_in_background: bool = False


def build_graph(p: beam.Pipeline, config: RunConfig):
    """Add the whole job to ``p``; returns the PCollection holding the manifest."""
    if config.catalog.embedding_column:
        return _build(p, config, *_vector_features(p, config))
    return _build(p, config, *_image_features(p, config))


def _vector_features(p: beam.Pipeline, config: RunConfig):
    """Precomputed vectors, in blocks of rows (``pipeline.vector_blocks``) from the reader to
    the feature writer: ReadVectors → ValidateRows → DeduplicateIds (per hash bucket of
    the id) → ValidateVectors."""
    buckets = vector_blocks.bucket_count(
        read_vectors.estimated_rows(config.catalog, config.model.dim))
    rows = p | "ReadVectors" >> read_vectors.ReadVectors(config.catalog, config.model.dim)
    valid = rows | "ValidateRows" >> beam.ParDo(
        read_vectors.SplitInvalidBlockRowsFn()).with_outputs(ERRORS, main="rows")
    previous = None
    if config.previous_run:
        previous = p | "ReadPreviousKeys" >> read_vectors.ReadPreviousVectorKeys(
            config.previous_run, buckets)
    unique = valid.rows | "DeduplicateIds" >> DeduplicateBlocks(buckets, previous)
    checked = unique.rows | "ValidateVectors" >> beam.ParDo(
        read_vectors.ValidateVectorBlocksFn(
            config.model.model_id, features_schema(config.model, config.catalog))
    ).with_outputs(ERRORS, read_vectors.REUSED, main="rows")
    return (rows, valid, unique, previous is not None, checked.rows,
            checked[read_vectors.REUSED], [checked[ERRORS]], buckets)


def _image_features(p: beam.Pipeline, config: RunConfig):
    """Images: read bytes, reuse unchanged ones, decode and embed the rest."""
    rows = p | "ReadCatalog" >> ReadCatalog(config.catalog)
    valid = rows | "ValidateRows" >> beam.ParDo(SplitInvalidRowsFn()).with_outputs(
        ERRORS, main="rows")
    previous = None
    if config.previous_run:
        previous = p | "ReadPreviousFeatures" >> ReadPreviousFeatures(config.previous_run)
    unique = valid.rows | "DeduplicateIds" >> DeduplicateProductIds(previous)
    read = unique.rows | "ReadBytes" >> beam.ParDo(ReadImageBytesFn(config.fetch)).with_outputs(
        ERRORS, main="rows")
    changed = read.rows | "SplitUnchanged" >> beam.ParDo(
        SplitUnchangedFn(config.model.model_id)).with_outputs(REUSED, main="rows")
    decoded = changed.rows | "Decode" >> beam.ParDo(
        DecodeImageFn(config.model.input_size, config.max_image_pixels)).with_outputs(
        ERRORS, main="rows")
    embedded = decoded.rows | "Embed" >> EmbedImages(
        config.model, batch_size=config.batch_size, threads=config.model_threads,
        lanes=config.model_lanes)
    _ = read.rows | "ProgressFetched" >> count_as(progress.FETCHED)
    _ = decoded.rows | "ProgressDecoded" >> count_as(progress.DECODED)
    return (rows, valid, unique, previous is not None, embedded.features, changed[REUSED],
            [read[ERRORS], decoded[ERRORS], embedded[ERRORS]], 0)


def _build(p, config, rows, valid, unique, has_previous, new_features, reused, stage_errors,
           buckets=0):
    """Everything after the features: the same for images and precomputed vectors.

    ``buckets`` > 0: the rows, features and removed ids are blocks (lists) of rows
    cut into that many hash buckets (precomputed vectors); counts and progress weigh
    each element by its rows.
    """
    size = read_vectors.block_size if buckets else None
    if not has_previous:  # nothing to reuse: the features are written where they are made
        features = new_features
    else:
        features = (new_features, reused) | "AllFeatures" >> beam.Flatten()
    feature_files = features | "WriteFeatures" >> WriteFeatures(
        config.output, features_schema(config.model, config.catalog), blocks=bool(buckets))

    errors = ((valid[ERRORS], unique[ERRORS], *stage_errors)
              | "AllErrors" >> beam.Flatten())
    error_files = (errors
                   | "ErrorsToJson" >> beam.Map(files.json_line)
                   | "WriteErrors" >> beam.io.WriteToText(
                       files.join(config.output, ERRORS_DIR, ERRORS_PREFIX),
                       file_name_suffix=".jsonl"))

    # Live progress: side branches that count rows per stage (see pipeline.progress).
    _ = rows | "ProgressRead" >> count_as(progress.READ, size)
    _ = new_features | "ProgressEmbedded" >> count_as(progress.EMBEDDED, size)
    _ = reused | "ProgressReused" >> count_as(progress.REUSED, size)
    _ = errors | "ProgressFailed" >> count_failures()
    _ = feature_files | "ProgressFeatureFiles" >> count_as(progress.FEATURE_FILES)

    written = [error_files]  # outputs that must be final before the manifest says so
    if config.features_only:
        # No index and no neighbours: the manifest waits for the feature files.
        index = p | "NoIndex" >> beam.Create([])
        shards = p | "NoShards" >> beam.Create([])
        written.append(feature_files)
    else:
        background = config.annoy_in_background and config.search != "annoy"
        build_index = BuildIndex(
            config.output, config.model.model_id, config.top_k, config.search,
            config.n_trees, config.search_k, config.seed, config.partition_by,
            config.exclude_same, config.pca_dim, config.quality, background=background)
        built = feature_files | "BuildIndex" >> build_index
        # Only an Annoy search waits for the forest; exact and IVF queries start from the
        # planned settings, so the Annoy build is off their critical path.
        queried = (built["built"] if config.search == "annoy" else built["planned"]) | (
            "QueryNeighbors" >> QueryNeighbors(
                config.output, config.top_k, config.min_similarity, config.duplicate_threshold,
                config.nlist, config.nprobe, config.seed, config.recall_target))
        index = (build_index.await_built(built["planned"], queried["shards"])
                 if background else built["built"])
        groups = ((features, queried[NEAR_DUPLICATES])
                  | "DuplicateGroups" >> WriteDuplicateGroups(config.output, buckets))
        shards = queried["shards"]
        _ = shards | "ProgressShards" >> count_as(progress.NEIGHBOR_SHARDS)
        written.append(groups)

    counts = {count_rows.INPUT: rows, count_rows.EMBEDDED: features,
              count_rows.REUSED: reused, count_rows.REMOVED: unique[REMOVED],
              count_rows.FAILED: errors} | "CountRows" >> count_rows.CountRows(
                  {count_rows.INPUT: len, count_rows.EMBEDDED: len, count_rows.REUSED: len,
                   count_rows.REMOVED: len} if buckets else None)
    return ((counts, index, shards, *written)
            | "WriteManifest" >> WriteManifest(config.output, config.settings,
                                               config.started_at))
