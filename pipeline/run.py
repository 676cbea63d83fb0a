"""Entry point: ``python -m pipeline.run --input=… --output=… [--model=…] [Beam options]``.

Checks the catalogue and loads the model once before anything starts (so a
wrong column name or an unreachable model is one sentence and exit code 2, not
a worker stack trace), builds the graph, runs it on the chosen Beam runner and
prints where the outputs are with a short summary.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before Beam's and TensorFlow's imports, which log
    from pipeline import logs as _early_logs

    _early_logs.quiet_startup()

import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,  # noqa: E402
                                                  StandardOptions, WorkerOptions)

from pipeline import (cli, dry_run, files, interrupts, logs, object_store, publish,  # noqa: E402
                      run_errors, run_layout, run_lock)
from pipeline.run_progress import (RunProgress, expected_rows,  # noqa: E402
                                   workers_share_this_machine)
from pipeline.local_runner import is_direct, runner_for
from pipeline.graph import build_graph
from pipeline.models import engines
from pipeline.models.registry import ModelLoadError, resolve_model
from pipeline.options import SimilarityOptions
from pipeline.quality import KNOBS, Recipe, recipe_for
from pipeline.run_config import (ModelConfig, OutputConfig, RunConfig, RunnerConfig,
                                 SearchConfig)
from pipeline.run_layout import (DUPLICATES_DIR, ERRORS_DIR, FEATURES_DIR, INDEX_DIR,
                                 MANIFEST_FILE, PAIRS_PREFIX)
from pipeline.http_fetch import FetchConfig
from transforms.build_index import settle_background_builds
from transforms.query_neighbors import clear_stale_shards
from pipeline.catalog import CatalogError, inspect_catalog, manifest_kind
from transforms.read_vectors import vector_dim
from pipeline.vectors import external_model

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


def prepare_run_dir(run_dir: str) -> None:
    """Make ``run_dir`` ready for a fresh run: remove a previous run's artefacts there.

    ``manifest.json`` goes first, so an interrupted re-run never looks complete.
    Only the files this pipeline writes are touched.
    """
    files.makedirs(run_dir)
    manifest = files.join(run_dir, MANIFEST_FILE)
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    for sub in (FEATURES_DIR, ERRORS_DIR, INDEX_DIR, DUPLICATES_DIR):
        found = FileSystems.match([files.join(run_dir, sub, "**")])[0].metadata_list
        if found:
            FileSystems.delete([m.path for m in found])
    clear_stale_shards(run_dir)


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
    if opts.pca_dim and quality_recipe(opts).postprocessed:
        raise UsageError("--pca_dim is the old PCA-only search space; with --quality="
                         f"{opts.quality} use --whiten_dim instead (or --quality=fast)")
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


def quality_recipe(opts: SimilarityOptions) -> Recipe:
    """The run's quality recipe: the --quality profile with the knobs given applied."""
    try:
        return recipe_for(opts.quality, **{k: getattr(opts, k) for k in KNOBS})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def previous_run_for(root: str, model_id: str, full_rebuild: bool) -> tuple[str | None, str]:
    """The last good run whose embeddings this run may reuse, and why (not)."""
    if full_rebuild:
        return None, "--full_rebuild"
    try:
        latest = publish.latest_run(root)
    except (OSError, ValueError) as exc:
        latest, damage = None, f"{files.join(root, publish.LATEST)} is unreadable ({exc})"
    else:
        damage = None
    if latest is None and damage is None:
        return None, "no previous run"
    if latest is not None and files.is_local(root):
        runs = os.path.realpath(os.path.join(root, publish.RUNS_DIR))
        if os.path.commonpath([runs, os.path.realpath(latest)]) != runs:
            damage = f"{files.join(root, publish.LATEST)} points outside {runs} ({latest})"
    if damage is None:
        try:  # a damaged previous run (manifest, Parquet, counts) must not stop this one
            previous_model = publish.verify_run(latest).get("model")
            _check_previous_features(latest)
        except Exception as exc:  # noqa: BLE001 - any damage means: do not reuse it
            damage = f"the previous run {latest} is damaged ({type(exc).__name__}: {exc})"
    if damage is not None:
        logging.getLogger(__name__).warning("%s; embedding every image again", damage)
        return None, f"full rebuild: {damage}"
    if previous_model != model_id:
        return None, f"the previous run used {previous_model}, not {model_id}"
    return latest, "reusing unchanged images"


def _check_previous_features(run_dir: str) -> None:
    """Raise unless every previous feature file has the columns reuse reads."""
    import pyarrow.parquet as pq

    from transforms.reuse_previous import PREVIOUS_COLUMNS

    for match in FileSystems.match([run_layout.feature_shards(run_dir)])[0] \
            .metadata_list:
        with FileSystems.open(match.path) as handle:
            names = set(pq.ParquetFile(handle).schema_arrow.names)
        missing = [c for c in PREVIOUS_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{match.path} lacks the columns {missing}")


def carried_column(catalog, name: str | None, option: str) -> str | None:
    """The feature column holding manifest column ``name`` (checked at start-up)."""
    if name is None:
        return None
    column = catalog.feature_column(name)
    if column is not None:
        return column
    available = [c[0] for c in catalog.carried]
    raise UsageError(f"{option}={name}: the catalogue has no such column (it carries "
                     f"{available or 'no columns: use a manifest, not a glob'})")


def make_config(options: PipelineOptions) -> RunConfig:
    """Check the catalogue, resolve the model and fix every setting of the run.

    Each fact is set once, in its group; what manifest.json records is derived
    from the groups (``RunConfig.manifest_settings``).
    """
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
    if catalog.embedding_column:
        batch_size, lanes = 0, 0
    else:
        batch_size = opts.batch_size or engines.preferred_batch(model.engine)
        lanes = engines.lanes_for(model.engine, threads, opts.model_lanes)
    return RunConfig(
        catalog=catalog,
        model=ModelConfig(resolved=model, batch_size=batch_size, threads=threads, lanes=lanes,
                          max_image_pixels=opts.max_image_pixels),
        fetch=FetchConfig(read_timeout=opts.fetch_timeout,
                          total_timeout=max(opts.fetch_total_timeout, opts.fetch_timeout),
                          max_retries=opts.fetch_retries,
                          max_bytes=opts.max_image_bytes, user_agent=opts.fetch_user_agent,
                          allow_private_hosts=opts.allow_private_hosts,
                          concurrency=opts.fetch_concurrency),
        search=SearchConfig(
            top_k=opts.top_k, search=opts.search, n_trees=opts.n_trees,
            search_k=opts.search_k, seed=opts.seed, nlist=opts.nlist, nprobe=opts.nprobe,
            recall_target=opts.recall_target, pca_dim=opts.pca_dim,
            quality=quality_recipe(opts), min_similarity=opts.min_similarity,
            duplicate_threshold=opts.duplicate_threshold,
            partition_column=carried_column(catalog, opts.partition_by, "--partition_by"),
            exclude_column=carried_column(catalog, opts.exclude_same, "--exclude_same")),
        output=OutputConfig(root=opts.output, run_id=run_id, started_at=started_at,
                            previous_run=previous, reuse=reuse_note,
                            features_only=opts.features_only),
        runner=RunnerConfig(
            name=options.view_as(StandardOptions).runner or "DirectRunner",
            workers=workers, versions=library_versions(),
            annoy_in_background=is_direct(options) and options.view_as(
                DirectOptions).direct_running_mode != "multi_processing"))


def _phase_line(phases: dict) -> str | None:
    """``start-up 1.2 s · embedding 14.0 s · …`` from phase start offsets (seconds)."""
    if not phases:
        return None
    order = sorted(phases.items(), key=lambda item: item[1])
    end = phases.get("done", order[-1][1])
    parts = []
    for (name, start), (_, following) in zip(order, order[1:] + [("done", end)]):
        if name != "done" and following >= start:
            parts.append(f"{name} {following - start:.1f} s")
    return " · ".join(parts) or None


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["    " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]


def summarize(manifest: dict, phases: dict | None = None, evaluation: dict | None = None) -> str:
    """The compact table a person reads after the run: counts, top failures, phase
    times, search and recall, precision when evaluated, and where LATEST points."""
    counts = manifest["counts"]
    timings = manifest["timings"]
    lines = [
        f"Done in {timings['wall_seconds']:.1f} s ({timings['images_per_second']} images/s) "
        f"with {manifest['model']} ({manifest['dim']}-d, {manifest.get('engine', '?')}).",
    ]
    header = ("input", "embedded", "reused", "new", "removed", "failed")
    values = tuple(str(counts.get(key, 0)) for key in
                   ("input", "embedded", "reused", "newly_embedded", "removed", "failed"))
    lines += ["  rows"] + _table([header, values])
    failures = sorted(counts.get("failed_by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    if failures:
        shown = ", ".join(f"{count} × {reason}" for reason, count in failures[:5])
        more = f", … {len(failures) - 5} more reasons" if len(failures) > 5 else ""
        lines.append(f"  failures  {shown}{more}")
    phase_line = _phase_line(phases or {})
    if phase_line:
        lines.append(f"  phases    {phase_line}")
    index_bits = [f"index build {timings['index_build_seconds']} s"
                  if timings.get("index_build_seconds") is not None else None,
                  f"queries {timings['query_seconds_total']} s (all workers)"
                  if timings.get("query_seconds_total") is not None else None]
    if any(index_bits):
        lines.append("  search    " + ", ".join(b for b in index_bits if b))
    if "neighbors" in manifest:
        lines.append(f"  neighbours {manifest['neighbors']['products']} products, top "
                     f"{manifest['top_k']} ({manifest['index']['search']} search)")
    recall = (manifest.get("neighbors") or {}).get("recall_estimate") or {}
    if recall.get("recall") is not None and not recall.get("sampled"):
        lines.append("  recall    exact search: every list is exact (no sample needed)")
    elif recall.get("recall") is not None:
        lines.append(f"  recall    @{recall['k']} estimate {recall['recall']:.4f} on "
                     f"{recall['sampled']} sampled products (target {recall['target']})"
                     + ("  BELOW TARGET" if recall.get("below_target") else ""))
    if evaluation:
        label = evaluation.get("label_column") or "label"
        precision = {k: v for k, v in evaluation.items() if k.startswith("precision@")
                     and k.endswith("_published")}
        for key, value in precision.items():
            lines.append(f"  {key.split('_')[0]} by {label}: {value}")
    out = manifest["run_dir"]
    lines += [
        f"Outputs in {out}:",
        f"  {files.join(out, 'neighbors')}/  per-product top-{manifest['top_k']} JSONL",
        f"  {files.join(out, f'{PAIRS_PREFIX}-*.jsonl')}  flat master/similar pairs",
        f"  {files.join(out, FEATURES_DIR)}/  embeddings (Parquet)",
        f"  {files.join(out, ERRORS_DIR)}/  one line per failed row",
        f"  {files.join(out, MANIFEST_FILE)}",
        f"Published: {files.join(manifest['output'], publish.LATEST)} -> "
        f"{publish.RUNS_DIR}/{manifest['run_id']} (LATEST now points to this run)",
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


def _log_level(opts: SimilarityOptions) -> str:
    return logs.level_from(opts.log_level, opts.verbose)


def _quiet_workers(options: PipelineOptions, level: str) -> None:
    """Worker processes log at the run's level unless the user set Beam's own option."""
    worker = options.view_as(WorkerOptions)
    if worker.default_sdk_harness_log_level is None:
        worker.default_sdk_harness_log_level = logs.worker_log_level(level)


def _start_progress(options: PipelineOptions, opts: SimilarityOptions,
                    config: RunConfig) -> RunProgress:
    """Live progress from status files where the workers share this machine; elsewhere
    one line saying so and the final counts from the job's metrics (pipeline.run_progress)."""
    enabled = not opts.no_progress
    total, exact = (expected_rows(config.catalog.kind, config.catalog.input) if enabled
                    else (None, False))
    return RunProgress(enabled, total, exact, max(0.5, opts.progress_interval),
                       local=workers_share_this_machine(options),
                       runner=config.runner.name)


class PublishRefused(RuntimeError):
    """The finished run looks like an accident; it is kept but LATEST is not moved."""


def check_publishable(manifest: dict, latest: str | None, opts: SimilarityOptions) -> None:
    """Refuse to replace a good run with an empty or collapsed one (--force_publish skips).

    Why: a misnamed catalogue or a dead image host gives a run that is complete
    but useless; a nightly job must not publish it over yesterday's good run.
    """
    counts, run_dir = manifest["counts"], manifest["run_dir"]
    if counts["embedded"] == 0:
        raise PublishRefused(f"{run_dir}: not published: the run has no products "
                             f"(--force_publish publishes it anyway)")
    if counts["input"] and counts["failed"] / counts["input"] > opts.max_failed_share:
        raise PublishRefused(f"{run_dir}: not published: {counts['failed']} of "
                             f"{counts['input']} rows failed, more than --max_failed_share="
                             f"{opts.max_failed_share} (--force_publish publishes it anyway)")
    if latest is not None:
        try:
            before = files.read_json(files.join(latest, MANIFEST_FILE))["counts"]["embedded"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if before and counts["embedded"] < (1 - opts.max_product_loss) * before:
            raise PublishRefused(
                f"{run_dir}: not published: {counts['embedded']} products against "
                f"{before} in the published run, a loss of more than --max_product_loss="
                f"{opts.max_product_loss} (--force_publish publishes it anyway)")


def run(argv=None, test_pipeline=None) -> dict:
    """Run the job with command-line ``argv``; returns the written manifest.

    The run writes ``ROOT/runs/<run_id>/`` (marked INCOMPLETE while it runs);
    only when it finished and its files match its manifest does ``ROOT/LATEST``
    move to it. ``test_pipeline`` lets tests pass Beam's ``TestPipeline``.
    The returned manifest also holds ``launcher_phases`` (seconds from start at
    which each phase was first seen), which is not written to manifest.json.
    One run at a time per output root: the root's lock (pipeline/run_lock.py)
    is held from before the previous run is read until the run returns.
    """
    started = time.monotonic()
    options = PipelineOptions(argv)
    opts = options.view_as(SimilarityOptions)
    level = _log_level(opts)
    _quiet_workers(options, level)
    object_store.preflight(options)  # gs:// unreachable: one line in seconds, not minutes
    if dry_run.requested(options):  # build the job only: no run directory, nothing published
        with logs.native_noise_filtered(enabled=level not in ("debug", "info")):
            config = make_config(options)
        pipeline = beam.Pipeline(runner=runner_for(options), options=options)
        build_graph(pipeline, config)
        return dry_run.build_job(pipeline, options, config.manifest_settings())
    _validate(opts)
    with run_lock.held(opts.output, opts.run_id) as lock:
        publish.remove_temporary(opts.output, recursive=False)  # a killed run's LATEST switch
        return _run_locked(options, opts, level, started, lock, test_pipeline)


def _run_locked(options: PipelineOptions, opts: SimilarityOptions, level: str, started: float,
                lock: run_lock.RootLock, test_pipeline) -> dict:
    """The run itself, while this process holds the output root's lock."""
    # Importing TensorFlow and converting a model print native INFO lines.
    with logs.native_noise_filtered(enabled=level not in ("debug", "info")):
        config = make_config(options)
    output = config.output
    lock.note_run_id(output.run_id)
    if FileSystems.exists(output.run_dir):
        raise UsageError(f"--run_id={output.run_id}: {output.run_dir} already "
                         f"exists; a run never overwrites another run's files")
    prepare_run_dir(output.run_dir)
    publish.mark_incomplete(output.run_dir, output.run_id)
    try:
        return _execute(options, opts, config, started, test_pipeline)
    except BaseException as exc:
        run_errors.note_run_dir(exc, output.run_dir)
        # An Annoy forest still building in the background must not write after the cleanup.
        settle_background_builds(output.run_dir, timeout=(
            INTERRUPTED_BUILD_WAIT_S if isinstance(exc, KeyboardInterrupt) else None))
        publish.remove_temporary(output.run_dir)  # Beam temp dirs, staged and partial files
        raise


def _execute(options: PipelineOptions, opts: SimilarityOptions, config: RunConfig,
             started: float, test_pipeline) -> dict:
    """Build and run the graph, then check and publish the run."""
    output = config.output
    pipeline = (test_pipeline if test_pipeline is not None
                else beam.Pipeline(runner=runner_for(options), options=options))
    # Before the graph is built: its counting steps carry the status directory to workers.
    progress = _start_progress(options, opts, config)
    pipeline_started = time.monotonic() - started
    phases = {}
    try:
        build_graph(pipeline, config)
        result = pipeline.run()
        progress.watch(result)
        result.wait_until_finish()
        progress.set_phase("publishing")
        if opts.eval_label_column and not opts.features_only:
            evaluate_published_run(output.run_dir, opts)
        if not opts.force_publish:
            check_publishable(files.read_json(files.join(output.run_dir, MANIFEST_FILE)),
                              publish.latest_run(output.root), opts)
        publish.publish(output.root, output.run_id)
        publish.prune_runs(output.root, opts.keep_runs, output.run_id, output.started_at)
    finally:
        phases = progress.close()
    manifest = files.read_json(files.join(output.run_dir, MANIFEST_FILE))
    offsets = {"start-up": 0.0}
    offsets.update({name: pipeline_started + t for name, t in phases.items()
                    if name != "starting"})
    offsets["done"] = time.monotonic() - started
    manifest["launcher_phases"] = offsets
    return manifest


# How long an interrupted run waits for an Annoy forest building in the background.
INTERRUPTED_BUILD_WAIT_S = 2.0

# Faults reported as "error: <message>" (their message is written for the user).
ONE_LINE_ERRORS = (CatalogError, ModelLoadError, UsageError, object_store.ObjectStoreError,
                   PublishRefused, run_lock.LockHeld)


def stop_line(exc: BaseException) -> str | None:
    """The one line for a fault that stops a run (exit 2), or None for a bug (traceback)."""
    if isinstance(exc, ONE_LINE_ERRORS):
        return f"error: {exc}"
    return run_errors.fault_line(exc)


def _output_arg(argv: list[str]) -> str | None:
    """The ``--output`` value in ``argv`` (either spelling), for the interrupted line."""
    for i, arg in enumerate(argv):
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
        if arg == "--output" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def interrupted_line(root: str | None) -> str:
    """``interrupted; LATEST still points at runs/<id>`` (or says there is none)."""
    try:
        latest = publish.latest_run(root) if root else None
    except Exception:  # noqa: BLE001 - the line must be printed whatever the root holds
        latest = None
    if latest is None:
        return "interrupted; no run is published (there is no LATEST)"
    name = os.path.basename(latest.replace(os.sep, "/").rstrip("/"))
    return f"interrupted; LATEST still points at {publish.RUNS_DIR}/{name}"


def main(argv=None) -> int:
    """Console entry: run, print the summary, and turn user errors into one line + exit 2.

    ``--help`` prints the options grouped by concern; an argument that neither
    our options nor Beam's know is one line and exit 2 before anything starts.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(cli.help_text())
        return 0
    level = logs.quiet_startup(argv)
    problem = cli.unknown_option_error(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    root = _output_arg(argv)
    try:
        with interrupts.handled(cleanup=run_lock.release_all,
                                message=lambda: interrupted_line(root)) as interrupt, \
                run_errors.beam_failure_logs_quiet(enabled=level == logs.QUIET):
            manifest = run(argv)
    except BaseException as exc:  # every fault that stops a run ends as one line
        if interrupt.signum is not None:
            if not interrupt.claim_exit():  # the helper thread is ending the process
                time.sleep(60)
            print(interrupted_line(root), file=sys.stderr)
            return interrupt.exit_code
        line = stop_line(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    if manifest.get("dry_run"):
        print(dry_run.describe(manifest))
        return 0
    evaluation = None
    if manifest.get("eval_label_column") or "--eval_label_column" in " ".join(argv):
        from pipeline.evaluate import EVALUATION_FILE

        path = files.join(manifest["run_dir"], EVALUATION_FILE)
        if FileSystems.exists(path):
            evaluation = files.read_json(path)
    print(summarize(manifest, manifest.get("launcher_phases"), evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
