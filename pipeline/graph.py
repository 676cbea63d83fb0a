"""The pipeline graph: catalogue → bytes → pixels → embeddings → features → index → neighbours.

Every transform is labelled so a run reads the same in the Beam UI of any
runner. Each stage that can fail has an ``errors`` output; all of them flow into
``errors/``, and ``manifest.json`` is written last, only if every input row is
accounted for.
"""

from __future__ import annotations

import apache_beam as beam

from pipeline import files, progress, vector_blocks
from pipeline.run_config import RunConfig
from transforms import count_rows
from transforms.build_index import BuildIndex
from transforms.decode import DecodeImageFn
from transforms.deduplicate import REMOVED, DeduplicateBlocks, DeduplicateProductIds
from transforms.embed import EmbedImages
from transforms.errors import ERRORS, error_line
from transforms.progress_tick import count_as, count_failures
from transforms.duplicate_groups import WriteDuplicateGroups
from transforms.neighbor_shards import NEAR_DUPLICATES
from transforms.query_neighbors import QueryNeighbors
from transforms.read_bytes import ReadImageBytesFn
from transforms.read_catalog import ReadCatalog
from transforms import read_vectors
from transforms.reuse_previous import REUSED, ReadPreviousFeatures, SplitUnchangedFn
from transforms.validate_rows import SplitInvalidRowsFn
from transforms.write_features import WriteFeatures
from pipeline.features import features_schema
from transforms.write_manifest import WriteManifest
from pipeline.run_layout import ERRORS_DIR, ERRORS_PREFIX


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
        read_vectors.estimated_rows(config.catalog, config.model.resolved.dim))
    rows = p | "ReadVectors" >> read_vectors.ReadVectors(config.catalog,
                                                         config.model.resolved.dim)
    valid = rows | "ValidateRows" >> beam.ParDo(
        read_vectors.SplitInvalidBlockRowsFn()).with_outputs(ERRORS, main="rows")
    previous = None
    if config.output.previous_run:
        previous = p | "ReadPreviousKeys" >> read_vectors.ReadPreviousVectorKeys(
            config.output.previous_run, buckets)
    unique = valid.rows | "DeduplicateIds" >> DeduplicateBlocks(buckets, previous)
    checked = unique.rows | "ValidateVectors" >> beam.ParDo(
        read_vectors.ValidateVectorBlocksFn(
            config.model.resolved.model_id,
            features_schema(config.model.resolved, config.catalog))
    ).with_outputs(ERRORS, read_vectors.REUSED, main="rows")
    return (rows, valid, unique, previous is not None, checked.rows,
            checked[read_vectors.REUSED], [checked[ERRORS]], buckets)


def _image_features(p: beam.Pipeline, config: RunConfig):
    """Images: read bytes, reuse unchanged ones, decode and embed the rest."""
    model = config.model
    rows = p | "ReadCatalog" >> ReadCatalog(config.catalog)
    valid = rows | "ValidateRows" >> beam.ParDo(SplitInvalidRowsFn()).with_outputs(
        ERRORS, main="rows")
    previous = None
    if config.output.previous_run:
        previous = p | "ReadPreviousFeatures" >> ReadPreviousFeatures(
            config.output.previous_run)
    unique = valid.rows | "DeduplicateIds" >> DeduplicateProductIds(previous)
    read = unique.rows | "ReadBytes" >> beam.ParDo(ReadImageBytesFn(config.fetch)).with_outputs(
        ERRORS, main="rows")
    changed = read.rows | "SplitUnchanged" >> beam.ParDo(
        SplitUnchangedFn(model.resolved.model_id)).with_outputs(REUSED, main="rows")
    decoded = changed.rows | "Decode" >> beam.ParDo(
        DecodeImageFn(model.resolved.input_size, model.max_image_pixels)).with_outputs(
        ERRORS, main="rows")
    embedded = decoded.rows | "Embed" >> EmbedImages(
        model.resolved, batch_size=model.batch_size, threads=model.threads,
        lanes=model.lanes)
    _ = read.rows | "ProgressFetched" >> count_as(progress.FETCHED)
    _ = decoded.rows | "ProgressDecoded" >> count_as(progress.DECODED)
    return (rows, valid, unique, previous is not None, embedded.features, changed[REUSED],
            [read[ERRORS], decoded[ERRORS], embedded[ERRORS]], 0)


def _build(p, config: RunConfig, rows, valid, unique, has_previous, new_features, reused,
           stage_errors, buckets=0):
    """Everything after the features: the same for images and precomputed vectors.

    ``buckets`` > 0: the rows, features and removed ids are blocks (lists) of rows
    cut into that many hash buckets (precomputed vectors); counts and progress weigh
    each element by its rows.
    """
    size = read_vectors.block_size if buckets else None
    run_dir, search = config.output.run_dir, config.search
    if not has_previous:  # nothing to reuse: the features are written where they are made
        features = new_features
    else:
        features = (new_features, reused) | "AllFeatures" >> beam.Flatten()
    feature_files = features | "WriteFeatures" >> WriteFeatures(
        run_dir, features_schema(config.model.resolved, config.catalog), blocks=bool(buckets))

    errors = ((valid[ERRORS], unique[ERRORS], *stage_errors)
              | "AllErrors" >> beam.Flatten())
    error_files = (errors
                   | "ErrorsToJson" >> beam.Map(error_line)
                   | "WriteErrors" >> beam.io.WriteToText(
                       files.join(run_dir, ERRORS_DIR, ERRORS_PREFIX),
                       file_name_suffix=".jsonl"))

    # Live progress: side branches that count rows per stage (see pipeline.progress).
    _ = rows | "ProgressRead" >> count_as(progress.READ, size)
    _ = new_features | "ProgressEmbedded" >> count_as(progress.EMBEDDED, size)
    _ = reused | "ProgressReused" >> count_as(progress.REUSED, size)
    _ = errors | "ProgressFailed" >> count_failures()
    _ = feature_files | "ProgressFeatureFiles" >> count_as(progress.FEATURE_FILES)

    written = [error_files]  # outputs that must be final before the manifest says so
    if config.output.features_only:
        # No index and no neighbours: the manifest waits for the feature files.
        index = p | "NoIndex" >> beam.Create([])
        shards = p | "NoShards" >> beam.Create([])
        written.append(feature_files)
    else:
        background = config.runner.annoy_in_background and search.search != "annoy"
        build_index = BuildIndex(run_dir, config.model.resolved.model_id, search,
                                 background=background)
        built = feature_files | "BuildIndex" >> build_index
        # Only an Annoy search waits for the forest; exact and IVF queries start from the
        # planned settings, so the Annoy build is off their critical path.
        queried = (built["built"] if search.search == "annoy" else built["planned"]) | (
            "QueryNeighbors" >> QueryNeighbors(run_dir, search))
        index = (build_index.await_built(built["planned"], queried["shards"])
                 if background else built["built"])
        groups = ((features, queried[NEAR_DUPLICATES])
                  | "DuplicateGroups" >> WriteDuplicateGroups(run_dir, buckets))
        shards = queried["shards"]
        _ = shards | "ProgressShards" >> count_as(progress.NEIGHBOR_SHARDS)
        written.append(groups)

    counts = {count_rows.INPUT: rows, count_rows.EMBEDDED: features,
              count_rows.REUSED: reused, count_rows.REMOVED: unique[REMOVED],
              count_rows.FAILED: errors} | "CountRows" >> count_rows.CountRows(
                  {count_rows.INPUT: len, count_rows.EMBEDDED: len, count_rows.REUSED: len,
                   count_rows.REMOVED: len} if buckets else None)
    return ((counts, index, shards, *written)
            | "WriteManifest" >> WriteManifest(run_dir, config.manifest_settings(),
                                               config.output.started_at))
