"""``python -m pipeline.query``: look up new images against a published run.

Single images::

    python -m pipeline.query --run=ROOT/LATEST IMAGE_OR_URL [IMAGE_OR_URL …]
        [--top_k=20] [--partition=VALUE] [--min_similarity=S] [--allow_private_hosts]

prints one JSON line per image, ``{"image", "neighbors": [{"product_id",
"similarity"}, …]}``, or ``{"image", "error", "reason", "stage"}`` for an image
that fails (the pipeline's reason codes). Batch mode::

    python -m pipeline.query --run=ROOT/LATEST --input=NEW_CATALOG --output=DIR [Beam options]

runs a Beam job over any catalogue form the pipeline reads and writes
``DIR/neighbors/*.jsonl``, ``DIR/errors/*.jsonl`` and ``DIR/query_manifest.json``.

Exit codes: 0 every image was looked up; 1 some images failed (their lines or
``errors/`` say why); 2 usage errors — a missing or unpublished run, a run
built without an index, a model that is not the run's, bad options.

A thin layer over :class:`pipeline.similarity_index.SimilarityIndex`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.similarity_index import QueryError, RunError, SimilarityIndex

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv):
    """Parse the command line; unknown ``--flags`` are kept for Beam in batch mode."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.query", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="ROOT, ROOT/LATEST or a run directory.")
    parser.add_argument("images", nargs="*", help="Image paths or http(s) URLs.")
    parser.add_argument("--input", help="Batch mode: a catalogue (glob, .csv, .jsonl, .parquet).")
    parser.add_argument("--output", help="Batch mode: the output directory.")
    parser.add_argument("--id_column", default="product_id")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--partition", default=None,
                        help="Only products with this --partition_by value of the run.")
    parser.add_argument("--min_similarity", type=float, default=None)
    parser.add_argument("--model", default=None,
                        help="The run's model (default: the one its manifest names); "
                        "another model is refused.")
    parser.add_argument("--model_cache_dir", default=None)
    parser.add_argument("--model_threads", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=0)
    parser.add_argument("--allow_private_hosts", action="store_true", default=False,
                        help="Allow image URLs on loopback/private hosts (refused by default).")
    parser.add_argument("--fetch_timeout", type=float, default=30.0)
    parser.add_argument("--max_image_bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--max_image_pixels", type=int, default=50_000_000)
    return parser.parse_known_args(argv)


def _usage(args, extra) -> str | None:
    batch = args.input is not None or args.output is not None
    if batch and (args.input is None or args.output is None):
        return "batch mode needs both --input and --output"
    if batch and args.images:
        return "give either images or --input/--output, not both"
    if not batch and not args.images:
        return "give at least one image or URL (or --input and --output for a catalogue)"
    if not batch and extra:
        return f"unknown options: {' '.join(extra)}"
    if args.top_k < 1:
        return f"--top_k must be at least 1, got {args.top_k}"
    if args.min_similarity is not None and not -1 <= args.min_similarity <= 1:
        return f"--min_similarity must be within [-1, 1], got {args.min_similarity}"
    return None


def fetch_config(args):
    """The pipeline's fetch settings (SSRF guard included) from the command line."""
    from pipeline.http_fetch import FetchConfig

    return FetchConfig(read_timeout=args.fetch_timeout,
                       total_timeout=max(60.0, args.fetch_timeout),
                       max_bytes=args.max_image_bytes,
                       allow_private_hosts=args.allow_private_hosts, concurrency=4)


def query_lines(index: SimilarityIndex, images, top_k: int, partition=None,
                min_similarity=None):
    """One output record per image, in order: its neighbours or its error."""
    for image in images:
        try:
            neighbors = index.query_image(image, top_k, partition, min_similarity)
        except QueryError as exc:
            yield {"image": image, "error": exc.message, "reason": exc.reason,
                   "stage": exc.stage}
            continue
        yield {"image": image, "neighbors": neighbors}


def run_single(args, out=None) -> int:
    """Look up each image on the command line; print one JSON line each."""
    out = out or sys.stdout
    index = SimilarityIndex.open(args.run, model=args.model, cache_dir=args.model_cache_dir,
                                 threads=args.model_threads, fetch_config=fetch_config(args),
                                 max_image_pixels=args.max_image_pixels)
    if args.partition is not None and args.partition not in {str(v) for v in
                                                              index.info.partitions}:
        raise RunError(f"--partition={args.partition}: the run has no such partition")
    failed = 0
    try:
        for record in query_lines(index, args.images, args.top_k, args.partition,
                                  args.min_similarity):
            failed += "error" in record
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
    finally:
        index.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run_batch(args, beam_args, test_pipeline=None) -> dict:
    """Run the look-up Beam job over ``--input``; returns its manifest."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import files
    from pipeline.catalog import inspect_catalog
    from pipeline.local_runner import runner_for
    from pipeline.models.handler import ModelHandler
    from transforms.query_catalog import QUERY_MANIFEST_FILE, build_query_graph

    index = SimilarityIndex.open(args.run, model=args.model, cache_dir=args.model_cache_dir,
                                 load_model_now=False)
    if args.partition is not None and args.partition not in {str(v) for v in
                                                              index.info.partitions}:
        raise RunError(f"--partition={args.partition}: the run has no such partition")
    model = index.model()
    catalog = inspect_catalog(args.input, args.id_column, args.image_column)
    threads = args.model_threads or os.cpu_count() or 1
    handler = ModelHandler(model, threads, batch_size=args.batch_size)
    files.makedirs(args.output)
    manifest_path = files.join(args.output, QUERY_MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    options = PipelineOptions(beam_args)
    pipeline = (test_pipeline if test_pipeline is not None
                else beam.Pipeline(runner=runner_for(options), options=options))
    build_query_graph(pipeline, catalog, model, index.run_dir, args.output, args.top_k,
                      fetch_config(args),
                      handler.batch_size, threads, handler.lanes, args.partition,
                      args.min_similarity, args.max_image_pixels,
                      settings={"run": index.run_dir, "input": args.input,
                                "model": model.model_id, "engine": model.engine,
                                "search": index.info.search})
    pipeline.run().wait_until_finish()
    return files.read_json(manifest_path)


def main(argv=None) -> int:
    """Console entry; exit 0 all looked up, 1 some failed, 2 usage errors (one line)."""
    args, extra = parse_args(argv)
    problem = _usage(args, extra)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.images:
            return run_single(args)
        manifest = run_batch(args, extra)
    except (RunError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    counts = manifest["counts"]
    print(f"looked up {counts['embedded']} of {counts['input']} images against "
          f"{manifest['run']}; {counts['failed']} failed; outputs in {args.output}")
    return EXIT_SOME_FAILED if counts["failed"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
