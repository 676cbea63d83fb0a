"""PostgreSQL: COPY a run into staging tables, then swap them in atomically.

The load never touches the live tables until everything is staged: rows go in
with ``COPY`` (psycopg 3 ``cursor.copy``), the primary key is built and the
table analysed, and only then one short transaction renames live → ``__old``,
staging → live, drops ``__old``, carries the old table's grants over and records
the run in ``similarity_runs``. Readers see the previous tables until that commit
and the new ones after it — never a missing, empty or half-loaded table. A
failed or refused load leaves the live tables as they were. Loads of the same
prefix are serialised with an advisory lock.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg import sql

from pipeline.exporters.pgcopy import embedding_copy_blocks
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

DEFAULT_LOCK_TIMEOUT = "60s"

_COLUMNS = {
    NEIGHBORS: ("product_id text NOT NULL, rank integer NOT NULL, neighbor_id text NOT NULL, "
                "similarity real NOT NULL", "product_id, rank"),
    EMBEDDINGS: ("product_id text NOT NULL, model text, embedding real[] NOT NULL",
                 "product_id"),
}
# Embeddings do not compress, and nobody filters on their elements: storing them
# uncompressed and skipping their statistics makes COPY faster and ANALYZE almost
# free (bench/MEASUREMENTS.md, "PostgreSQL export").
_AFTER_CREATE = {
    EMBEDDINGS: "ALTER TABLE {} ALTER COLUMN embedding SET STORAGE EXTERNAL, "
                "ALTER COLUMN embedding SET STATISTICS 0",
}
_RUNS_DDL = """CREATE TABLE IF NOT EXISTS {runs} (
    run_id text PRIMARY KEY, run_dir text, model text, dim integer, top_k integer,
    products bigint, neighbor_rows bigint, embeddings bigint, with_embeddings boolean,
    run_finished_at text, manifest jsonb, loaded_at timestamptz NOT NULL DEFAULT now())"""
_RUN_FIELDS = ("run_id", "run_dir", "model", "dim", "top_k", "products", "neighbor_rows",
               "embeddings", "with_embeddings", "run_finished_at", "manifest")


def _pkey(table: str) -> sql.Identifier:
    return sql.Identifier(f"{table}_pkey")


@contextmanager
def _load_lock(conn: psycopg.Connection, names: TableNames) -> Iterator[None]:
    """Serialise loads into the same tables (a session-level advisory lock)."""
    key = f"pipeline.export:{names.prefix}"
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [key])
    conn.commit()
    try:
        yield
    finally:
        if not conn.closed:
            try:
                conn.rollback()
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])
                conn.commit()
            except psycopg.Error:  # the session is unusable; closing it releases the lock
                pass


def _create_staging(conn: psycopg.Connection, names: TableNames, base: str) -> str:
    staging = names.staging(base)
    columns, _ = _COLUMNS[base]
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(staging)))
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(staging),
                                                        sql.SQL(columns)))
    if base in _AFTER_CREATE:
        conn.execute(sql.SQL(_AFTER_CREATE[base]).format(sql.Identifier(staging)))
    return staging


def _finish_staging(conn: psycopg.Connection, staging: str, base: str) -> None:
    """Primary key and planner statistics, built before the swap so it stays short."""
    _, key = _COLUMNS[base]
    conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})").format(
        sql.Identifier(staging), _pkey(staging), sql.SQL(key)))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(staging)))
    conn.commit()


def stage_neighbors(conn: psycopg.Connection, names: TableNames, run: Run,
                    counts: LoadCounts) -> None:
    """COPY the run's neighbour rows into the neighbours staging table and index it."""
    staging = _create_staging(conn, names, NEIGHBORS)
    copy_sql = sql.SQL("COPY {} (product_id, rank, neighbor_id, similarity) FROM STDIN"
                       ).format(sql.Identifier(staging))
    with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        for row in neighbor_rows(run, counts):
            copy.write_row(row)
    _finish_staging(conn, staging, NEIGHBORS)


def stage_embeddings(conn: psycopg.Connection, names: TableNames, run: Run,
                     matrix: FeatureMatrix) -> int:
    """COPY the run's embeddings (binary format) into the embeddings staging table."""
    staging = _create_staging(conn, names, EMBEDDINGS)
    copy_sql = sql.SQL("COPY {} (product_id, model, embedding) FROM STDIN (FORMAT BINARY)"
                       ).format(sql.Identifier(staging))
    with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        for block in embedding_copy_blocks(matrix.product_ids, matrix.model_id or run.model,
                                           matrix.vectors):
            copy.write(block)
    _finish_staging(conn, staging, EMBEDDINGS)
    return matrix.count


def _copy_grants(conn: psycopg.Connection, source: str, target: str) -> None:
    """Give ``target`` the privileges granted on ``source`` (e.g. the shop's read role).

    A swapped-in table is a new table: without this, a role that could read the
    live table yesterday would get "permission denied" after the nightly load.
    """
    rows = conn.execute(
        """SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
                  a.privilege_type, a.is_grantable
           FROM pg_class c, aclexplode(c.relacl) a
           WHERE c.oid = %s::regclass AND a.grantee <> c.relowner""",
        [sql.Identifier(source).as_string(conn)]).fetchall()
    for grantee, privilege, grantable in rows:
        grantee_sql = sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.SQL(grantee)
        conn.execute(sql.SQL("GRANT {} ON {} TO {}{}").format(
            sql.SQL(privilege), sql.Identifier(target), grantee_sql,
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))


def _table_exists(conn: psycopg.Connection, name: str) -> bool:
    found = conn.execute("SELECT to_regclass(%s)", [sql.Identifier(name).as_string(conn)])
    return found.fetchone()[0] is not None


def swap_in(conn: psycopg.Connection, names: TableNames, bases: list[str], record: dict,
            lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> None:
    """In one transaction: replace each live table by its staging table and record the run.

    ``lock_timeout`` bounds how long the swap waits behind a long-running reader
    (queued readers wait behind the swap); on timeout nothing changes.
    """
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
    for base in bases:
        live, staging, old = (sql.Identifier(n) for n in
                              (names.live(base), names.staging(base), names.old(base)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(old))
        if _table_exists(conn, names.live(base)):
            _copy_grants(conn, names.live(base), names.staging(base))
            conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(live, old))
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, live))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(old))
        conn.execute(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
            live, _pkey(names.staging(base)), _pkey(names.live(base))))
    runs = sql.Identifier(names.live(RUNS))
    conn.execute(sql.SQL(_RUNS_DDL).format(runs=runs))
    columns = sql.SQL(", ").join(map(sql.Identifier, _RUN_FIELDS))
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(f)) for f in _RUN_FIELDS[1:])
    conn.execute(sql.SQL(
        "INSERT INTO {runs} ({columns}, loaded_at) VALUES ({values}, now()) "
        "ON CONFLICT (run_id) DO UPDATE SET {updates}, loaded_at = now()").format(
        runs=runs, columns=columns, updates=updates,
        values=sql.SQL(", ").join(sql.Placeholder(f) for f in _RUN_FIELDS)), record)
    conn.commit()


def load_postgres(run: Run, dsn: str, prefix: str = "", with_embeddings: bool = False,
                  lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> LoadCounts:
    """Load ``run`` into the database at ``dsn`` and make it live atomically.

    Returns the counts now live. Reloading the same run yields the same tables
    (and one ``similarity_runs`` row, with a fresh ``loaded_at``).
    """
    names = table_names(prefix)
    counts = LoadCounts()
    matrix = read_embeddings(run) if with_embeddings else None  # checked before connecting
    with psycopg.connect(dsn) as conn, _load_lock(conn, names):
        bases = [NEIGHBORS]
        stage_neighbors(conn, names, run, counts)
        if matrix is not None:
            counts.embeddings = stage_embeddings(conn, names, run, matrix)
            bases.append(EMBEDDINGS)
        swap_in(conn, names, bases, run_record(run, counts, with_embeddings), lock_timeout)
    return counts
