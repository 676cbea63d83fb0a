"""The precomputed-vectors path in blocks: contracts across block and bucket boundaries.

Rows travel in blocks (``pipeline.vector_blocks``) and duplicate ids are found per hash
bucket. These runs use tiny blocks and buckets so that duplicates, bad vectors and
refused rows fall into different blocks and buckets, and check that the outcome is the
one the row-wise rules give: the same run with one block and one bucket.
"""

from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import vector_blocks, vectors
from pipeline.records import CatalogRow
from pipeline.run import run

DIM = 6


def _vectors(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, DIM))
    return [(centres[i % 4] + 0.2 * rng.standard_normal(DIM)).tolist() for i in range(n)]


def _manifest(path):
    """40 rows: good vectors, bad ones, duplicate ids spread over the file, a refused row."""
    vecs = _vectors(40)
    ids = [f"p{i:02d}" for i in range(40)]
    ids[25] = "p03"            # duplicate of a good row, much later (another block)
    ids[33] = "p03"            # and a third occurrence
    ids[12] = "p07"            # duplicate whose first occurrence has a bad vector
    vecs[7] = None             # p07's first row: null vector, still the kept row
    vecs[17] = [1.0] * (DIM - 1)
    vecs[21] = [float("inf")] + [0.5] * (DIM - 1)
    vecs[29] = [0.0] * DIM
    ids[36] = ""               # refused by the id rule
    vecs[38] = list(vecs[5])   # same vector as p05: identical bytes
    table = pa.table({"product_id": ids, "embedding": pa.array(vecs, pa.list_(pa.float32())),
                      "category": [f"c{i % 4}" for i in range(40)],
                      "rank": list(range(40))})
    pq.write_table(table, path)
    return path


def _outputs(m):
    run_dir = m["run_dir"]
    features = pq.read_table(glob.glob(f"{run_dir}/features/*.parquet")).sort_by("product_id")
    errors = []
    for path in glob.glob(f"{run_dir}/errors/*.jsonl"):
        errors += [json.loads(line) for line in open(path) if line.strip()]
    errors.sort(key=lambda e: (e["reason"], e["product_id"] or "", e["error"]))
    neighbours = []
    for path in sorted(glob.glob(f"{run_dir}/neighbors/*.jsonl")):
        neighbours += [json.loads(line) for line in open(path) if line.strip()]
    neighbours.sort(key=lambda line: line["product_id"])
    duplicates = open(glob.glob(f"{run_dir}/duplicates/*.jsonl")[0]).read()
    return features, errors, neighbours, duplicates


def _run(manifest, out, monkeypatch, block_rows, bucket_rows, *extra):
    monkeypatch.setattr(vector_blocks, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(vector_blocks, "BUCKET_ROWS", bucket_rows)
    return run([f"--input={manifest}", f"--output={out}", "--embedding_column=embedding",
                "--top_k=3", "--search=exact", *extra])


def test_tiny_blocks_and_buckets_give_the_row_wise_outcome(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path / "v.parquet")
    small = _run(manifest, tmp_path / "small", monkeypatch, 7, 5)   # 6 blocks, 8 buckets
    whole = _run(manifest, tmp_path / "whole", monkeypatch, 10_000, 10_000)
    assert small["counts"] == whole["counts"]
    counts = small["counts"]
    assert counts["input"] == 40 and counts["embedded"] + counts["failed"] == 40
    assert counts["failed_by_reason"] == {
        "read:duplicate_product_id": 3, "read:missing_product_id": 1, "read:non_finite": 1,
        "read:null_vector": 1, "read:wrong_length": 1, "read:zero_vector": 1}
    assert counts["embedded"] == 32

    features, errors, neighbours, duplicates = _outputs(small)
    assert (features, errors, neighbours, duplicates) == _outputs(whole)
    ids = features.column("product_id").to_pylist()
    assert len(ids) == len(set(ids)) == 32 and "p07" not in ids
    # The first occurrence wins, wherever the later ones are.
    kept = [row for row in features.to_pylist() if row["product_id"] == "p03"][0]
    assert kept["rank"] == 3 and kept["category"] == "c3"
    dropped = sorted(e["error"] for e in errors if e["reason"] == "duplicate_product_id")
    assert dropped == [
        "product_id 'p03' appears 3 times in the catalogue; kept manifest row 4 (None), "
        "dropped manifest row 26",
        "product_id 'p03' appears 3 times in the catalogue; kept manifest row 4 (None), "
        "dropped manifest row 34",
        "product_id 'p07' appears 2 times in the catalogue; kept manifest row 8 (None), "
        "dropped manifest row 13"]
    assert [e["product_id"] for e in errors if e["reason"] == "null_vector"] == ["p07"]
    for row in features.to_pylist():
        vector = np.asarray(row["embedding"], np.float32)
        assert row["sha256"] == vectors.vector_sha256(vector)
        assert row["model"] == "external" and row["width"] is None
    schema = pq.read_schema(glob.glob(f"{small['run_dir']}/features/*.parquet")[0])
    assert schema.field("embedding").type == pa.list_(pa.float32())
    assert schema.metadata[b"embedding_dim"] == str(DIM).encode()
    # Identical vectors under two ids (in different blocks): linked as identical bytes.
    groups = [json.loads(line) for line in duplicates.splitlines()]
    assert [same for g in groups for same in g["same_image_bytes"]] == [["p05", "p38"]]
    assert len(neighbours) == 32


def test_reuse_under_a_previous_run_with_tiny_blocks(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path / "v.parquet")
    root = tmp_path / "root"
    first = _run(manifest, root, monkeypatch, 7, 5)
    assert first["counts"]["reused"] == 0
    rows = pq.read_table(manifest).to_pylist()
    rows[1]["embedding"] = [-v for v in rows[1]["embedding"]]     # p01 changed
    rows[3]["embedding"] = list(rows[3]["embedding"])              # p03 unchanged
    rows = [r for r in rows if r["product_id"] not in ("p10", "p11")]  # two removed
    rows.append(dict(rows[0], product_id="brand-new"))             # one added
    rows.append(dict(rows[4], product_id="p04"))                   # another duplicate
    second_manifest = tmp_path / "second.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(manifest)), second_manifest)
    second = _run(second_manifest, root, monkeypatch, 7, 5)
    c = second["counts"]
    assert c["input"] == 40 and c["embedded"] + c["failed"] == c["input"]
    assert c["removed"] == 2
    assert c["embedded"] == 31 and c["newly_embedded"] == 2 and c["reused"] == 29
    assert c["failed_by_reason"]["read:duplicate_product_id"] == 4
    # The same books as with one block and one bucket, on the same two catalogues.
    whole_root = tmp_path / "whole"
    _run(manifest, whole_root, monkeypatch, 10_000, 10_000)
    assert _run(second_manifest, whole_root, monkeypatch, 10_000, 10_000)["counts"] == c


@pytest.mark.parametrize("buckets", [1, 3, 8])
def test_keep_first_is_the_same_whatever_the_bucketing(buckets):
    rows = [CatalogRow(pid, None, n, {})
            for n, pid in enumerate(["a", "b", "a", "c", "b", "a", "d"])]
    matrix = np.eye(7, DIM, dtype=np.float32)
    block = vector_blocks.rows_block(rows, matrix, [None] * 7, [], DIM)
    parts: dict = {}
    for half in (block.batch.slice(0, 4), block.batch.slice(4)):
        for bucket, part in vector_blocks.split_by_bucket(half, "product_id", buckets):
            parts.setdefault(bucket, []).append(part)
    kept, dropped = {}, []
    for bucket_parts in parts.values():
        result = vector_blocks.keep_first(bucket_parts, None)
        numbers = result.rows.column("row_number").to_pylist()
        kept.update(zip(result.kept.column("product_id").to_pylist(),
                        result.kept.column("row_number").to_pylist()))
        dropped += [(numbers[d], numbers[k], count) for d, k, count in result.duplicates]
    assert kept == {"a": 0, "b": 1, "c": 3, "d": 6}
    assert sorted(dropped) == [(2, 0, 3), (4, 1, 2), (5, 0, 3)]


def test_block_round_trips_through_its_bytes():
    rows = [CatalogRow("x", "i.jpg", 0, {"k": "v"})]
    block = vector_blocks.rows_block(rows, np.ones((1, DIM), np.float32), [None], [
        pa.field("k", pa.string())], DIM)
    again = vector_blocks.block_from_bytes(vector_blocks.block_to_bytes(block))
    assert again.batch.equals(block.batch)
