"""``python -m pipeline.export … sqlite``: the tables in one SQLite file, swapped atomically."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np

from pipeline.export import main
from tests.export_fixtures import assert_reload_is_atomic_under_a_reader, neighbor_lists, write_run


def load(run_path: str, db: str, *extra: str) -> int:
    return main([f"--run={run_path}", "sqlite", db, *extra])


def neighbor_table(db: str, table: str = "product_neighbors") -> dict[str, list]:
    with sqlite3.connect(db) as conn:
        return neighbor_lists(conn, table)


def test_load_publishes_every_list_with_ranks_in_similarity_order(tmp_path):
    run = write_run(str(tmp_path / "run"), count=40, top_k=6)
    db = str(tmp_path / "similar.db")

    assert load(run.path, db) == 0

    table = neighbor_table(db)
    assert sorted(table) == sorted(run.ids)
    for product_id, rows in table.items():
        assert [r[0] for r in rows] == list(range(1, 7))
        assert [(r[1], r[2]) for r in rows] == run.neighbors[product_id]
    with sqlite3.connect(db) as conn:
        record = conn.execute("SELECT model, dim, top_k, products, neighbor_rows, "
                              "with_embeddings, manifest FROM similarity_runs").fetchall()
    assert [r[:6] for r in record] == [(run.model, 8, 6, 40, 240, 0)]
    assert json.loads(record[0][6])["model"] == run.model


def test_embeddings_round_trip_as_float32_blobs(tmp_path):
    run = write_run(str(tmp_path / "run"), count=15, dim=24)
    db = str(tmp_path / "similar.db")
    assert load(run.path, db, "--with_embeddings") == 0
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT product_id, model, embedding FROM product_embeddings"
                            ).fetchall()
        dim = conn.execute("SELECT dim FROM similarity_runs").fetchone()[0]
    assert sorted(r[0] for r in rows) == sorted(run.ids)
    for product_id, model, blob in rows:
        assert model == run.model and len(blob) == dim * 4
        np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), run.vector(product_id))


def test_reload_is_idempotent_and_replaces_everything(tmp_path):
    db = str(tmp_path / "similar.db")
    first = write_run(str(tmp_path / "first"), count=12, seed=1)
    assert load(first.path, db) == 0
    snapshot = neighbor_table(db)
    assert load(first.path, db) == 0
    assert neighbor_table(db) == snapshot
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM similarity_runs").fetchone()[0] == 1

    second = write_run(str(tmp_path / "second"), count=5, seed=2, prefix="s")
    assert load(second.path, db) == 0
    assert sorted(neighbor_table(db)) == sorted(second.ids)
    with sqlite3.connect(db) as conn:
        latest = conn.execute("SELECT products FROM similarity_runs ORDER BY loaded_at DESC "
                              "LIMIT 1").fetchone()[0]
    assert latest == 5


def test_reload_swaps_atomically_under_a_concurrent_reader(tmp_path):
    db = str(tmp_path / "similar.db")
    new = assert_reload_is_atomic_under_a_reader(
        tmp_path, lambda path: load(path, db), lambda: sqlite3.connect(db, timeout=30),
        sqlite3.Error)
    assert sorted(neighbor_table(db)) == sorted(new.ids)


def test_views_on_the_tables_keep_working_after_a_reload(tmp_path):
    db = str(tmp_path / "similar.db")
    run = write_run(str(tmp_path / "run"), count=10)
    assert load(run.path, db) == 0
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE VIEW top_match AS SELECT product_id, neighbor_id "
                     "FROM product_neighbors WHERE rank = 1")
    newer = write_run(str(tmp_path / "newer"), count=4, prefix="x")
    assert load(newer.path, db) == 0
    with sqlite3.connect(db) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT product_id FROM top_match")) == \
            sorted(newer.ids)


def test_incomplete_run_is_refused_without_creating_the_file(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"), count=5, complete=False)
    db = str(tmp_path / "similar.db")
    assert load(run.path, db) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete run" in err and len(err.splitlines()) == 1
    assert not os.path.exists(db)


def test_features_only_run_is_refused(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"), count=5, features_only=True)
    assert load(run.path, str(tmp_path / "similar.db")) == 2
    assert "features-only run" in capsys.readouterr().err


def test_inconsistent_run_rolls_back_to_the_previous_content(tmp_path, capsys):
    db = str(tmp_path / "similar.db")
    good = write_run(str(tmp_path / "good"), count=10)
    assert load(good.path, db, "--with_embeddings") == 0
    bad = write_run(str(tmp_path / "bad"), count=7, prefix="b", manifest_products=8)

    assert load(bad.path, db) == 2

    assert "promises 8" in capsys.readouterr().err
    assert sorted(neighbor_table(db)) == sorted(good.ids)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM product_embeddings").fetchone()[0] == 10
        assert conn.execute("SELECT count(*) FROM similarity_runs").fetchone()[0] == 1


def test_table_prefix_names_every_table(tmp_path):
    db = str(tmp_path / "similar.db")
    run = write_run(str(tmp_path / "run"), count=5)
    assert load(run.path, db, "--table_prefix=shop_", "--with_embeddings") == 0
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"shop_product_neighbors", "shop_product_embeddings",
                      "shop_similarity_runs"}
