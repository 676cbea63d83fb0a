"""Load a finished run into what the live shop reads: ``python -m pipeline.export``.

    python -m pipeline.export --run=RUN_DIR elasticsearch --out=DIR [--index=similar_products]
        [--chunk_docs=5000] [--chunk_bytes=10MB] [--with_embeddings] [--es_url=URL]
    python -m pipeline.export --run=RUN_DIR postgres --dsn=DSN [--table_prefix=P]
        [--with_embeddings]
    python -m pipeline.export --run=RUN_DIR sqlite PATH [--table_prefix=P] [--with_embeddings]

A run without ``manifest.json`` (still running, failed or interrupted) is
refused with one sentence and exit code 2, as is a run whose files disagree
with its manifest; nothing is published then. A target that rejects the load
(database error, Elasticsearch items that failed) gives exit code 1. Every
target is idempotent: loading the same run twice leaves the same data.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from pipeline.exporters.run_data import Run, RunDataError, open_run

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3,
          "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3}


def parse_size(text: str) -> int:
    """Bytes from ``5000000``, ``10MB``, ``8MiB``, ``512kb`` (decimal k/M/G, binary Ki/Mi/Gi)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 10MB or 8388608")
    unit = (match.group(2) or "").lower().rstrip("b")
    value = int(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--run`` plus one sub-command per target."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description="Load a finished similarity run into Elasticsearch, PostgreSQL or SQLite.")
    parser.add_argument("--run", help="the run's output directory (must hold manifest.json)")
    run_too = argparse.ArgumentParser(add_help=False)
    run_too.add_argument("--run", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    embeddings = argparse.ArgumentParser(add_help=False)
    embeddings.add_argument("--with_embeddings", action="store_true",
                            help="also publish each product's embedding (without it, a "
                                 "product_embeddings table from an earlier load is left as "
                                 "it was)")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")

    es = targets.add_parser(
        "elasticsearch", parents=[run_too, embeddings],
        help="_bulk NDJSON files + mapping.json, optionally sent to a cluster",
        description="Write _bulk files (document id = product id) and mapping.json; with "
                    "--es_url also create the index if missing and send the documents. "
                    "An API key may be given in the ES_API_KEY environment variable, "
                    "user:password in the URL.")
    es.add_argument("--out", required=True, help="directory for bulk-NNNNN.ndjson files")
    es.add_argument("--index", default="similar_products", help="index name")
    es.add_argument("--chunk_docs", type=_positive_int, default=None,
                    help="most documents per file and request (default 5000 unless only "
                         "--chunk_bytes is given)")
    es.add_argument("--chunk_bytes", type=parse_size, default=None,
                    help="most bytes per file and request, e.g. 10MB (default 100MiB, "
                         "Elasticsearch's default http.max_content_length)")
    es.add_argument("--es_url", help="also load into this cluster, e.g. https://host:9200")

    pg = targets.add_parser(
        "postgres", parents=[run_too, embeddings],
        help="COPY into staging tables and swap them in atomically",
        description="Load product_neighbors (and product_embeddings) with COPY and swap "
                    "them in within one transaction; records the run in similarity_runs. "
                    "The schema is the connection's search_path.")
    pg.add_argument("--dsn", required=True,
                    help="libpq connection string or URL (password via PGPASSWORD or .pgpass)")
    pg.add_argument("--table_prefix", default="", help="prefix for the table names")
    pg.add_argument("--lock_timeout", default="60s",
                    help="longest the swap waits for readers' locks (default 60s)")

    lite = targets.add_parser(
        "sqlite", parents=[run_too, embeddings],
        help="the same tables in a SQLite file, replaced in one transaction",
        description="Write product_neighbors (and product_embeddings as float32 BLOBs) and "
                    "similarity_runs to a SQLite file, replaced in one transaction.")
    lite.add_argument("path", metavar="PATH", help="SQLite database file (created if missing)")
    lite.add_argument("--table_prefix", default="", help="prefix for the table names")
    return parser


def export_elasticsearch(run: Run, args: argparse.Namespace) -> int:
    """Write the bulk files and, with ``--es_url``, send them; 1 if any item failed."""
    from pipeline.exporters.elastic import (
        DEFAULT_CHUNK_BYTES,
        DEFAULT_CHUNK_DOCS,
        index_body,
        write_bulk_files,
    )

    chunk_docs = args.chunk_docs or (None if args.chunk_bytes else DEFAULT_CHUNK_DOCS)
    chunk_bytes = args.chunk_bytes or DEFAULT_CHUNK_BYTES
    result = write_bulk_files(run, args.out, index=args.index, chunk_docs=chunk_docs,
                              chunk_bytes=chunk_bytes, with_embeddings=args.with_embeddings)
    print(f"Wrote {result.documents} documents for index {args.index!r} in "
          f"{len(result.files)} bulk files (largest {result.largest_file_bytes} bytes) and "
          f"mapping.json to {args.out}")
    if not args.es_url:
        return 0
    import elasticsearch

    from pipeline.exporters.elastic_send import connect, send_run
    try:
        client = connect(args.es_url, api_key=os.environ.get("ES_API_KEY") or None)
        report = send_run(client, run, args.index, index_body(run.dim, args.with_embeddings),
                          with_embeddings=args.with_embeddings, chunk_docs=chunk_docs,
                          chunk_bytes=chunk_bytes)
    except (elasticsearch.ApiError, elasticsearch.TransportError) as exc:
        print(f"error: Elasticsearch at {args.es_url} refused the load: {exc}", file=sys.stderr)
        return 1
    created = "created" if report.created_index else "existing"
    print(f"Sent {report.sent} documents to {created} index {args.index!r} on Elasticsearch "
          f"{report.server_version}: {report.sent - report.failed} indexed, "
          f"{report.failed} failed")
    if report.failed:
        print(f"error: {report.failed} of {report.sent} documents were rejected; first: "
              + "; ".join(report.reasons), file=sys.stderr)
        return 1
    return 0


def export_postgres(run: Run, args: argparse.Namespace) -> int:
    """Load into PostgreSQL; 1 if the database refused."""
    import psycopg

    from pipeline.exporters.postgres import load_postgres
    try:
        counts = load_postgres(run, args.dsn, prefix=args.table_prefix,
                               with_embeddings=args.with_embeddings,
                               lock_timeout=args.lock_timeout)
    except psycopg.Error as exc:
        print(f"error: the PostgreSQL load failed and the live tables are unchanged: "
              f"{str(exc).strip()}", file=sys.stderr)
        return 1
    print(_loaded("PostgreSQL", counts, args.table_prefix))
    return 0


def export_sqlite(run: Run, args: argparse.Namespace) -> int:
    """Load into a SQLite file; 1 if SQLite refused."""
    import sqlite3

    from pipeline.exporters.sqlite import load_sqlite
    try:
        counts = load_sqlite(run, args.path, prefix=args.table_prefix,
                             with_embeddings=args.with_embeddings)
    except sqlite3.Error as exc:
        print(f"error: the SQLite load into {args.path} failed and its tables are unchanged: "
              f"{exc}", file=sys.stderr)
        return 1
    print(_loaded(f"SQLite {args.path}", counts, args.table_prefix))
    return 0


def _loaded(where: str, counts, prefix: str) -> str:
    text = (f"Loaded {counts.products} products ({counts.neighbor_rows} neighbour rows) into "
            f"{where} table {prefix}product_neighbors")
    if counts.embeddings is not None:
        text += f" and {counts.embeddings} embeddings into {prefix}product_embeddings"
    return text


TARGETS = {"elasticsearch": export_elasticsearch, "postgres": export_postgres,
           "sqlite": export_sqlite}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 target refused, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.error("--run=RUN_DIR is required")
    try:
        run = open_run(args.run)
        return TARGETS[args.target](run, args)
    except RunDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
