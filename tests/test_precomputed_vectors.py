"""Runs on precomputed vectors (--embedding_column): bad vectors, counts, reuse, exports."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import vectors
from pipeline.run import run

DIM = 8


def _good(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, DIM))
    return [(centres[i % 3] + 0.1 * rng.standard_normal(DIM)).tolist() for i in range(n)]


def _write(path, ids, vecs, categories):
    table = pa.table({"product_id": ids, "embedding": pa.array(vecs, pa.list_(pa.float32())),
                      "category": categories})
    pq.write_table(table, path)
    return path


@pytest.fixture()
def manifest(tmp_path):
    good = _good(12)
    ids = [f"p{i:02d}" for i in range(12)] + ["null", "short", "nan", "zero"]
    vecs = good + [None, [1.0] * (DIM - 1), [float("nan")] * DIM, [0.0] * DIM]
    cats = [f"c{i % 3}" for i in range(12)] + ["c0"] * 4
    return _write(tmp_path / "vectors.parquet", ids, vecs, cats)


def _jsonl(pattern):
    out = []
    for path in sorted(glob.glob(pattern)):
        out += [json.loads(line) for line in open(path) if line.strip()]
    return out


def test_bad_vectors_become_error_rows_and_counts_balance(manifest, tmp_path):
    m = run([f"--input={manifest}", f"--output={tmp_path / 'out'}", "--embedding_column=embedding",
             "--top_k=3"])
    assert m["counts"]["input"] == 16 and m["counts"]["embedded"] == 12
    assert m["counts"]["failed_by_reason"] == {"read:non_finite": 1, "read:null_vector": 1,
                                               "read:wrong_length": 1, "read:zero_vector": 1}
    assert m["model"] == "external" and m["dim"] == DIM and m["engine"] == "external"
    rows = pq.read_table(glob.glob(f"{m['run_dir']}/features/*.parquet")).to_pylist()
    for row in rows:
        assert abs(np.linalg.norm(row["embedding"]) - 1) < 1e-5
        assert row["sha256"] == vectors.vector_sha256(np.asarray(row["embedding"], np.float32))
    neighbours = _jsonl(f"{m['run_dir']}/neighbors/*.jsonl")
    assert len(neighbours) == 12
    # Same cluster (i % 3) is the nearest.
    for line in neighbours:
        i = int(line["product_id"][1:])
        assert int(line["neighbors"][0]["product_id"][1:]) % 3 == i % 3


def test_model_id_and_reuse(manifest, tmp_path):
    root = tmp_path / "out"
    args = [f"--input={manifest}", f"--output={root}", "--embedding_column=embedding",
            "--model_id=clip-b32", "--top_k=3"]
    run(args)
    table = pq.read_table(manifest).to_pylist()
    table[0]["embedding"] = [-v for v in table[0]["embedding"]]  # changed
    table = table[1:] + [dict(table[1], product_id="new")]        # p00 changed, new added
    table.insert(0, dict(table[-1], product_id="p00", embedding=table[0]["embedding"]))
    table = [r for r in table if r["product_id"] != "p05"]          # removed
    second = tmp_path / "second.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(manifest)), second)
    m = run([f"--input={second}", *args[1:]])
    c = m["counts"]
    assert m["model"] == "clip-b32"
    assert c["embedded"] + c["failed"] == c["input"]
    assert c["removed"] == 1 and c["embedded"] == 12 and c["reused"] == 10


def test_csv_json_array_and_not_a_list(tmp_path):
    good = _good(4)
    lines = ["product_id,embedding,image"]
    lines += [f'q{i},"{json.dumps(v)}",img{i}.jpg' for i, v in enumerate(good)]
    lines += ['bad,"not a list",x.jpg', 'strs,"[""a"",""b""]",x.jpg']
    path = tmp_path / "v.csv"
    path.write_text("\n".join(lines) + "\n")
    m = run([f"--input={path}", f"--output={tmp_path / 'out'}", "--embedding_column=embedding",
             "--top_k=2"])
    assert m["counts"]["embedded"] == 4
    assert m["counts"]["failed_by_reason"] == {"read:non_numeric": 1, "read:not_a_list": 1}


def test_check_vector_reasons():
    for value, reason in ((None, "null_vector"), ("{}", "not_a_list"), (3, "not_a_list"),
                          ([1, "a"], "non_numeric"), ([1.0], "wrong_length"),
                          ([0.0, 0.0], "zero_vector"), ([1.0, float("inf")], "non_finite")):
        with pytest.raises(vectors.VectorError) as exc:
            vectors.check_vector(value, 2)
        assert exc.value.reason == reason
    assert np.allclose(vectors.check_vector("[3, 4]", 2), [0.6, 0.8])


def test_no_tensorflow_import_on_the_vectors_path(manifest, tmp_path):
    code = ("import sys; from pipeline.run import run; "
            f"run(['--input={manifest}', '--output={tmp_path / 'o'}', "
            "'--embedding_column=embedding', '--top_k=3']); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_export_and_evaluate(manifest, tmp_path):
    from pipeline import evaluate, export

    m = run([f"--input={manifest}", f"--output={tmp_path / 'out'}", "--embedding_column=embedding",
             "--top_k=3", "--eval_label_column=category"])
    result = json.load(open(f"{m['run_dir']}/evaluation.json"))
    assert result["products"] == 12 and result["precision@10_exact"] is not None
    assert export.main([f"--run={m['run_dir']}", "sqlite", str(tmp_path / "s.db")]) == 0
    assert evaluate.main([f"--run={m['run_dir']}", f"--labels={manifest}",
                          "--label_column=category", "--embedding_column=embedding"]) == 0
