"""SQLite: the run's tables in one file, replaced in a single transaction.

One ``BEGIN IMMEDIATE … COMMIT`` drops the live tables, recreates and fills
them and records the run in ``similarity_runs``: a reader sees the previous
tables until the commit and the new ones after it, never a missing or partly
filled table, and a failed load rolls back to the previous content. Views the
shop defined on the tables keep working (tables are recreated under the same
names). Embeddings are stored as little-endian float32 BLOBs of ``dim * 4``
bytes (``numpy.frombuffer(blob, "<f4")``).

In SQLite's default rollback-journal mode readers may wait (busy timeout) while
a large load commits; a file that is read while being reloaded is best put in
WAL mode once (``PRAGMA journal_mode=WAL``), where readers never wait.
"""

from __future__ import annotations

import sqlite3
from typing import Iterator

from pipeline.exporters.run_data import Run, read_embeddings
from pipeline.exporters.tables import (
    EMBEDDINGS,
    NEIGHBORS,
    RUNS,
    LoadCounts,
    TableNames,
    neighbor_rows,
    run_record,
    table_names,
)
from pipeline.features import FeatureMatrix

DEFAULT_BUSY_TIMEOUT_S = 60.0

_TABLES = {
    # WITHOUT ROWID: the table itself is the (product_id, rank) B-tree, so a product's
    # list is one contiguous range, read in rank order.
    NEIGHBORS: ("product_id TEXT NOT NULL, rank INTEGER NOT NULL, neighbor_id TEXT NOT NULL, "
                "similarity REAL NOT NULL, PRIMARY KEY (product_id, rank)) WITHOUT ROWID"),
    EMBEDDINGS: "product_id TEXT NOT NULL PRIMARY KEY, model TEXT, embedding BLOB NOT NULL)",
}
_RUNS_DDL = """CREATE TABLE IF NOT EXISTS "{runs}" (
    run_id TEXT PRIMARY KEY, run_dir TEXT, model TEXT, dim INTEGER, top_k INTEGER,
    products INTEGER, neighbor_rows INTEGER, embeddings INTEGER, with_embeddings INTEGER,
    run_finished_at TEXT, manifest TEXT,
    loaded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"""
_RUN_FIELDS = ("run_id", "run_dir", "model", "dim", "top_k", "products", "neighbor_rows",
               "embeddings", "with_embeddings", "run_finished_at", "manifest")


def _recreate(conn: sqlite3.Connection, table: str, base: str) -> None:
    conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    conn.execute(f'CREATE TABLE "{table}" ({_TABLES[base]}')


def _embedding_rows(run: Run, matrix: FeatureMatrix
                    ) -> Iterator[tuple[str, str | None, bytes]]:
    model = matrix.model_id or run.model
    vectors = matrix.vectors.astype("<f4", copy=False)
    for product_id, vector in zip(matrix.product_ids, vectors):
        yield product_id, model, vector.tobytes()


def _record_run(conn: sqlite3.Connection, names: TableNames, record: dict) -> None:
    runs = names.live(RUNS)
    conn.execute(_RUNS_DDL.format(runs=runs))
    columns = ", ".join(_RUN_FIELDS)
    updates = ", ".join(f"{f} = excluded.{f}" for f in _RUN_FIELDS[1:])
    conn.execute(
        f'INSERT INTO "{runs}" ({columns}, loaded_at) '
        f"VALUES ({', '.join(':' + f for f in _RUN_FIELDS)}, "
        f"strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) "
        f"ON CONFLICT (run_id) DO UPDATE SET {updates}, loaded_at = excluded.loaded_at",
        record)


def load_sqlite(run: Run, path: str, prefix: str = "", with_embeddings: bool = False,
                busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> LoadCounts:
    """Load ``run`` into the SQLite file at ``path`` (created if missing), atomically.

    Returns the counts now live. Reloading the same run yields the same tables
    and one ``similarity_runs`` row with a fresh ``loaded_at``.
    """
    names = table_names(prefix)
    counts = LoadCounts()
    matrix = read_embeddings(run) if with_embeddings else None  # checked before locking
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        neighbors = names.live(NEIGHBORS)
        _recreate(conn, neighbors, NEIGHBORS)
        conn.executemany(f'INSERT INTO "{neighbors}" VALUES (?, ?, ?, ?)',
                         neighbor_rows(run, counts))
        if matrix is not None:
            embeddings = names.live(EMBEDDINGS)
            _recreate(conn, embeddings, EMBEDDINGS)
            cursor = conn.executemany(f'INSERT INTO "{embeddings}" VALUES (?, ?, ?)',
                                      _embedding_rows(run, matrix))
            counts.embeddings = cursor.rowcount
        record = run_record(run, counts, with_embeddings)
        record["with_embeddings"] = int(with_embeddings)
        _record_run(conn, names, record)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return counts
