"""Entry point: ``python -m pipeline.run --input=… --output=… [--model=…] [Beam options]``.

Checks the catalogue and loads the model once before anything starts (so a
wrong column name or an unreachable model is one sentence and exit code 2, not
a worker stack trace), builds the graph, runs it on the chosen Beam runner and
prints where the outputs are with a short summary.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from importlib import metadata

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                  StandardOptions)

from pipeline import files, publish
from pipeline.local_runner import is_direct, runner_for
from pipeline.graph import ERRORS_DIR, RunConfig, build_graph
from pipeline.models import engines
from pipeline.models.registry import ModelLoadError, resolve_model
from pipeline.options import SimilarityOptions
from transforms.build_index import INDEX_DIR
from transforms.duplicate_groups import DUPLICATES_DIR
from transforms.fetch import FetchConfig
from transforms.query_neighbors import clear_stale_shards
from transforms.read_catalog import CatalogError, inspect_catalog, manifest_kind
from transforms.read_vectors import vector_dim
from pipeline.vectors import external_model
from transforms.write_features import FEATURES_DIR
from transforms.write_manifest import MANIFEST_FILE

VERSIONED_PACKAGES = ("apache-beam", "tensorflow", "tensorflow-hub", "annoy", "numpy",
                      "pyarrow", "pillow")


class UsageError(ValueError):
    """An option value that cannot work; reported as one sentence."""


def library_versions() -> dict:
    """Versions of the libraries that shape the output, for the manifest."""
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def worker_count(options: PipelineOptions) -> int:
    """How many worker processes share this machine (1 unless DirectRunner multi-processing)."""
    direct = options.view_as(DirectOptions)
    if (direct.direct_running_mode == "multi_processing"
            and is_direct(options)):
        return max(1, direct.direct_num_workers or os.cpu_count() or 1)
    return 1


def prepare_output(output: str) -> None:
    """Make ``output`` ready for a fresh run: remove a previous run's artefacts there.

    ``manifest.json`` goes first, so an interrupted re-run never looks complete.
    Only the files this pipeline writes are touched.
    """
    files.makedirs(output)
    manifest = files.join(output, MANIFEST_FILE)
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    for sub in (FEATURES_DIR, ERRORS_DIR, INDEX_DIR, DUPLICATES_DIR):
        found = FileSystems.match([files.join(output, sub, "**")])[0].metadata_list
        if found:
            FileSystems.delete([m.path for m in found])
    clear_stale_shards(output)


def _validate(opts: SimilarityOptions) -> None:
    missing = [flag for flag, value in (("--input", opts.input), ("--output", opts.output))
               if not value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"required (see --help)")
    if opts.top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {opts.top_k}")
    if opts.model_lanes < 0:
        raise UsageError(f"--model_lanes must be at least 1 (or 0 for the engine's best), "
                         f"got {opts.model_lanes}")
    if opts.batch_size < 0:
        raise UsageError(f"--batch_size must be at least 1 (or 0 for the engine's best), "
                         f"got {opts.batch_size}")
    if opts.min_similarity is not None and not -1 <= opts.min_similarity <= 1:
        raise UsageError(f"--min_similarity must be within [-1, 1], got {opts.min_similarity}")
    if not -1 <= opts.duplicate_threshold <= 1:
        raise UsageError(f"--duplicate_threshold must be within [-1, 1], got "
                         f"{opts.duplicate_threshold}")
    if opts.eval_label_column and manifest_kind(opts.input) is None:
        raise UsageError("--eval_label_column needs a manifest with labels, not an image glob")
    if opts.pca_dim < 0:
        raise UsageError(f"--pca_dim must be 0 (off) or positive, got {opts.pca_dim}")
    if opts.keep_runs < 1:
        raise UsageError(f"--keep_runs must be at least 1, got {opts.keep_runs}")
    if opts.run_id is not None and (not opts.run_id or "/" in opts.run_id
                                    or opts.run_id.startswith(".")):
        raise UsageError(f"--run_id must be a plain directory name, got {opts.run_id!r}")
    if not opts.embedding_column and (opts.model_id or opts.embedding_dim):
        raise UsageError("--model_id and --embedding_dim need --embedding_column")
    if opts.embedding_column and manifest_kind(opts.input) is None:
        raise UsageError("--embedding_column needs a manifest (.parquet, .csv or .jsonl), "
                         "not an image glob")
    if opts.embedding_dim < 0:
        raise UsageError(f"--embedding_dim must be positive, got {opts.embedding_dim}")
    if opts.fetch_concurrency < 1:
        raise UsageError(f"--fetch_concurrency must be at least 1, got {opts.fetch_concurrency}")


def previous_run_for(root: str, model_id: str, full_rebuild: bool) -> tuple[str | None, str]:
    """The last good run whose embeddings this run may reuse, and why (not)."""
    if full_rebuild:
        return None, "--full_rebuild"
    latest = publish.latest_run(root)
    if latest is None:
        return None, "no previous run"
    previous_model = files.read_json(files.join(latest, MANIFEST_FILE)).get("model")
    if previous_model != model_id:
        return None, f"the previous run used {previous_model}, not {model_id}"
    return latest, "reusing unchanged images"


def carried_column(catalog, name: str | None, option: str) -> str | None:
    """The feature column holding manifest column ``name`` (checked at start-up)."""
    if name is None:
        return None
    for manifest_name, output_name, _ in catalog.carried:
        if manifest_name == name:
            return output_name
    available = [c[0] for c in catalog.carried]
    raise UsageError(f"{option}={name}: the catalogue has no such column (it carries "
                     f"{available or 'no columns: use a manifest, not a glob'})")


def make_config(options: PipelineOptions) -> RunConfig:
    """Check the catalogue, resolve the model and fix every setting of the run."""
    opts = options.view_as(SimilarityOptions)
    _validate(opts)
    started_at = time.time()
    catalog = inspect_catalog(opts.input, opts.id_column, opts.image_column,
                              embedding_column=opts.embedding_column)
    if catalog.embedding_column:  # precomputed vectors: no model to load, no TensorFlow
        model = external_model(opts.model_id, opts.embedding_dim or vector_dim(catalog))
    else:
        model = resolve_model(opts.model, cache_dir=opts.model_cache_dir, engine=opts.engine)
    carried_column(catalog, opts.eval_label_column, "--eval_label_column")
    run_id = opts.run_id or publish.new_run_id()
    previous, reuse_note = previous_run_for(opts.output, model.model_id, opts.full_rebuild)
    workers = worker_count(options)
    threads = opts.model_threads or max(1, (os.cpu_count() or 1) // workers)
    fetch = FetchConfig(read_timeout=opts.fetch_timeout,
                        total_timeout=max(opts.fetch_total_timeout, opts.fetch_timeout),
                        max_retries=opts.fetch_retries,
                        max_bytes=opts.max_image_bytes, user_agent=opts.fetch_user_agent,
                        allow_private_hosts=opts.allow_private_hosts,
                        concurrency=opts.fetch_concurrency)
    if catalog.embedding_column:
        batch_size, lanes = 0, 0
    else:
        batch_size = opts.batch_size or engines.preferred_batch(model.engine)
        lanes = engines.lanes_for(model.engine, threads, opts.model_lanes)
    settings = {
        "input": opts.input,
        "output": opts.output,
        "run_id": run_id,
        "run_dir": publish.run_dir(opts.output, run_id),
        "previous_run": previous,
        "reuse": reuse_note,
        "catalog_kind": catalog.kind,
        "embedding_column": catalog.embedding_column,
        "model": model.model_id,
        "model_name": model.name,
        "dim": model.dim,
        "input_size": model.input_size,
        "engine": model.engine,
        "batch_size": batch_size,
        "model_threads": threads,
        "model_lanes": lanes,
        "top_k": opts.top_k,
        "seed": opts.seed,
        "partition_by": opts.partition_by,
        "exclude_same": opts.exclude_same,
        "min_similarity": opts.min_similarity,
        "duplicate_threshold": opts.duplicate_threshold,
        "pca_dim": opts.pca_dim or None,
        "runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "workers": workers,
        "versions": library_versions(),
    }
    return RunConfig(output=publish.run_dir(opts.output, run_id), catalog=catalog, model=model, top_k=opts.top_k,
                     batch_size=batch_size, model_threads=threads, search=opts.search,
                     n_trees=opts.n_trees, search_k=opts.search_k, seed=opts.seed,
                     max_image_pixels=opts.max_image_pixels, fetch=fetch,
                     started_at=started_at, settings=settings,
                     features_only=opts.features_only, previous_run=previous,
                     partition_by=carried_column(catalog, opts.partition_by, "--partition_by"),
                     exclude_same=carried_column(catalog, opts.exclude_same, "--exclude_same"),
                     min_similarity=opts.min_similarity,
                     duplicate_threshold=opts.duplicate_threshold, pca_dim=opts.pca_dim,
                     model_lanes=lanes)


def summarize(manifest: dict) -> str:
    """A few lines a person reads after the run."""
    counts = manifest["counts"]
    timings = manifest["timings"]
    lines = [
        f"Done in {timings['wall_seconds']:.1f} s ({timings['images_per_second']} images/s) "
        f"with {manifest['model']} ({manifest['dim']}-d).",
        f"  input rows: {counts['input']}   embedded: {counts['embedded']}   "
        f"failed: {counts['failed']}",
    ]
    for reason, count in counts["failed_by_reason"].items():
        lines.append(f"    {count} × {reason}")
    if counts.get("reused") or counts.get("removed"):
        lines.append(f"  reused from the previous run: {counts['reused']}   newly embedded: "
                     f"{counts['newly_embedded']}   removed: {counts['removed']}")
    if "neighbors" in manifest:
        lines.append(f"  neighbours: {manifest['neighbors']['products']} products, top "
                     f"{manifest['top_k']} ({manifest['index']['search']} search)")
    out = manifest["run_dir"]
    lines += [
        f"Outputs in {out}:",
        f"  {files.join(out, 'neighbors')}/  per-product top-{manifest['top_k']} JSONL",
        f"  {files.join(out, 'similar_products-*.jsonl')}  flat master/similar pairs",
        f"  {files.join(out, FEATURES_DIR)}/  embeddings (Parquet)",
        f"  {files.join(out, ERRORS_DIR)}/  one line per failed row",
        f"  {files.join(out, MANIFEST_FILE)}",
        f"Published: {files.join(manifest['output'], publish.LATEST)} now points to this run",
    ]
    return "\n".join(lines)


def evaluate_published_run(run_dir: str, opts: SimilarityOptions) -> dict:
    """Write the run's evaluation.json, with precision by the manifest's label column."""
    from pipeline.evaluate import EVALUATION_FILE, evaluate_run, read_labels

    labels = read_labels(opts.input, opts.eval_label_column, opts.id_column, opts.image_column,
                         embedding_column=opts.embedding_column)
    result = evaluate_run(run_dir, labels)
    result["label_column"] = opts.eval_label_column
    files.write_json(files.join(run_dir, EVALUATION_FILE), result)
    return result


def run(argv=None, test_pipeline=None) -> dict:
    """Run the job with command-line ``argv``; returns the written manifest.

    The run writes ``ROOT/runs/<run_id>/`` (marked INCOMPLETE while it runs);
    only when it finished and its files match its manifest does ``ROOT/LATEST``
    move to it. ``test_pipeline`` lets tests pass Beam's ``TestPipeline``.
    """
    options = PipelineOptions(argv)
    opts = options.view_as(SimilarityOptions)
    config = make_config(options)
    prepare_output(config.output)
    publish.mark_incomplete(config.output, config.settings["run_id"])
    pipeline = (test_pipeline if test_pipeline is not None
                else beam.Pipeline(runner=runner_for(options), options=options))
    build_graph(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    if opts.eval_label_column and not opts.features_only:
        evaluate_published_run(config.output, opts)
    publish.publish(opts.output, config.settings["run_id"])
    publish.prune_runs(opts.output, opts.keep_runs, config.settings["run_id"],
                       config.started_at)
    return files.read_json(files.join(config.output, MANIFEST_FILE))


def main(argv=None) -> int:
    """Console entry: run, print the summary, and turn user errors into one line + exit 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = run(argv)
    except (CatalogError, ModelLoadError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summarize(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
