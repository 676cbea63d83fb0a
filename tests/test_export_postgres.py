"""``python -m pipeline.export … postgres`` against a real PostgreSQL started for the session.

Checks what the shop relies on: every product's list with ranks 1..k in
similarity order, a reload that swaps content atomically (a reader hammering
the table in another connection never sees it empty or missing), the indexes,
kept grants, exact embeddings, the run recorded in ``similarity_runs``, and
that refused or failed loads leave the live tables untouched.
"""

from __future__ import annotations

import numpy as np
import psycopg

from pipeline.export import main
from tests.export_fixtures import assert_reload_is_atomic_under_a_reader, neighbor_lists, write_run
from tests.pg_server import postgres_db, postgres_dsn  # noqa: F401 (fixtures)


def load(run_path: str, dsn: str, *extra: str) -> int:
    return main([f"--run={run_path}", "postgres", f"--dsn={dsn}", *extra])


def neighbor_table(dsn: str, table: str = "product_neighbors") -> dict[str, list]:
    with psycopg.connect(dsn) as conn:
        return neighbor_lists(conn, table)


def test_load_publishes_every_list_with_ranks_in_similarity_order(tmp_path, postgres_db):
    run = write_run(str(tmp_path / "run"), count=40, top_k=6)

    assert load(run.path, postgres_db) == 0

    table = neighbor_table(postgres_db)
    assert sorted(table) == sorted(run.ids)
    for product_id, rows in table.items():
        assert [r[0] for r in rows] == list(range(1, 7))
        assert [r[1] for r in rows] == [n for n, _ in run.neighbors[product_id]]
        similarities = [r[2] for r in rows]
        assert similarities == sorted(similarities, reverse=True)
        np.testing.assert_allclose(similarities, [s for _, s in run.neighbors[product_id]],
                                   atol=1e-6)
    with psycopg.connect(postgres_db) as conn:
        record = conn.execute("SELECT model, dim, top_k, products, neighbor_rows, "
                              "with_embeddings, manifest->>'model' FROM similarity_runs"
                              ).fetchall()
    assert record == [(run.model, 8, 6, 40, 240, False, run.model)]


def test_primary_key_serves_lookups_by_product(tmp_path, postgres_db):
    run = write_run(str(tmp_path / "run"), count=20)
    assert load(run.path, postgres_db, "--with_embeddings") == 0
    with psycopg.connect(postgres_db) as conn:
        indexes = dict(conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'").fetchall())
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT neighbor_id FROM product_neighbors WHERE product_id = 'p00007' "
            "ORDER BY rank").fetchall())
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()}
    assert "UNIQUE" in indexes["product_neighbors_pkey"]
    assert "(product_id, rank)" in indexes["product_neighbors_pkey"]
    assert "(product_id)" in indexes["product_embeddings_pkey"]
    assert "product_neighbors_pkey" in plan
    assert tables == {"product_neighbors", "product_embeddings", "similarity_runs"}  # no leftovers


def test_embeddings_round_trip_exactly(tmp_path, postgres_db):
    run = write_run(str(tmp_path / "run"), count=15, dim=24)
    assert load(run.path, postgres_db, "--with_embeddings") == 0
    with psycopg.connect(postgres_db) as conn:
        rows = conn.execute("SELECT product_id, model, embedding FROM product_embeddings"
                            ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(run.ids)
    for product_id, model, embedding in rows:
        assert model == run.model
        np.testing.assert_array_equal(np.asarray(embedding, dtype=np.float32),
                                      run.vector(product_id))


def test_reload_is_idempotent(tmp_path, postgres_db):
    run = write_run(str(tmp_path / "run"), count=12)
    assert load(run.path, postgres_db) == 0
    first = neighbor_table(postgres_db)
    assert load(run.path, postgres_db) == 0
    assert neighbor_table(postgres_db) == first
    with psycopg.connect(postgres_db) as conn:
        assert conn.execute("SELECT count(*) FROM similarity_runs").fetchone()[0] == 1


def test_reload_swaps_atomically_under_a_concurrent_reader(tmp_path, postgres_db):
    new = assert_reload_is_atomic_under_a_reader(
        tmp_path, lambda path: load(path, postgres_db),
        lambda: psycopg.connect(postgres_db, autocommit=True), psycopg.Error)
    assert sorted(neighbor_table(postgres_db)) == sorted(new.ids)  # nothing of old is left


def test_grants_on_the_live_table_survive_the_swap(tmp_path, postgres_db):
    run = write_run(str(tmp_path / "run"), count=5)
    assert load(run.path, postgres_db) == 0
    role = f"shop_reader_{postgres_db.rsplit('_', 1)[-1]}"
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role}")
        conn.execute(f"GRANT SELECT ON product_neighbors TO {role}")
    try:
        assert load(run.path, postgres_db) == 0
        with psycopg.connect(postgres_db) as conn:
            allowed = conn.execute("SELECT has_table_privilege(%s, 'product_neighbors', "
                                   "'SELECT')", [role]).fetchone()[0]
        assert allowed
    finally:
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_table_prefix_names_every_table(tmp_path, postgres_db):
    run = write_run(str(tmp_path / "run"), count=5)
    assert load(run.path, postgres_db, "--table_prefix=shop_", "--with_embeddings") == 0
    assert sorted(neighbor_table(postgres_db, "shop_product_neighbors")) == sorted(run.ids)
    with psycopg.connect(postgres_db) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()}
    assert tables == {"shop_product_neighbors", "shop_product_embeddings",
                      "shop_similarity_runs"}


def test_incomplete_run_is_refused_before_touching_the_database(tmp_path, postgres_db, capsys):
    run = write_run(str(tmp_path / "run"), count=5, complete=False)
    assert load(run.path, postgres_db) == 2
    assert "not a complete run" in capsys.readouterr().err
    with psycopg.connect(postgres_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone()[0] == 0


def test_inconsistent_run_leaves_the_live_tables_as_they_were(tmp_path, postgres_db, capsys):
    good = write_run(str(tmp_path / "good"), count=10)
    assert load(good.path, postgres_db) == 0
    bad = write_run(str(tmp_path / "bad"), count=7, prefix="b", manifest_products=8)

    assert load(bad.path, postgres_db) == 2

    assert "promises 8" in capsys.readouterr().err
    assert sorted(neighbor_table(postgres_db)) == sorted(good.ids)
    with psycopg.connect(postgres_db) as conn:
        assert conn.execute("SELECT count(*) FROM similarity_runs").fetchone()[0] == 1
        assert conn.execute("SELECT to_regclass('product_neighbors__staging')").fetchone()[0] \
            is None


def test_a_database_error_exits_1_and_keeps_the_live_tables(tmp_path, postgres_db, capsys):
    run = write_run(str(tmp_path / "run"), count=6)
    assert load(run.path, postgres_db) == 0
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute("CREATE VIEW top_match AS SELECT * FROM product_neighbors WHERE rank = 1")
    newer = write_run(str(tmp_path / "newer"), count=4, prefix="x")

    assert load(newer.path, postgres_db) == 1  # the view depends on the old table

    assert "live tables are unchanged" in capsys.readouterr().err
    assert sorted(neighbor_table(postgres_db)) == sorted(run.ids)


def test_bad_table_prefix_is_refused(tmp_path, postgres_db, capsys):
    run = write_run(str(tmp_path / "run"), count=3)
    assert load(run.path, postgres_db, "--table_prefix=shop; DROP") == 2
    assert "--table_prefix" in capsys.readouterr().err


def test_unreachable_server_exits_1(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"), count=3)
    assert load(run.path, "host=127.0.0.1 port=1 user=nobody connect_timeout=2") == 1
    assert "PostgreSQL load failed" in capsys.readouterr().err
