"""Evaluation figures: precision by label, recall against exact search, the comparison table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.evaluate import comparison_table, evaluate_run, main


def write_run(directory, vectors, ids, neighbors):
    (directory / "features").mkdir(parents=True)
    (directory / "neighbors").mkdir()
    pq.write_table(pa.table({
        "product_id": ids,
        "embedding": pa.array([v.tolist() for v in vectors], type=pa.list_(pa.float32())),
        "model": ["m@1"] * len(ids),
    }), directory / "features" / "features-00000-of-00001.parquet")
    with open(directory / "neighbors" / "neighbors-00000-of-00001.jsonl", "w") as handle:
        for pid, ns in neighbors.items():
            handle.write(json.dumps({"product_id": pid, "neighbors": [
                {"product_id": n, "similarity": s} for n, s in ns]}) + "\n")
    (directory / "manifest.json").write_text(json.dumps({"top_k": 2, "timings": {
        "wall_seconds": 1.0}, "counts": {"failed_by_reason": {"decode:empty": 1}}}))


def test_precision_and_recall_of_a_known_run(tmp_path):
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = ["a1", "a2", "b1", "b2"]
    # Published lists: exact for a1/a2/b1, b2's list has the wrong first neighbour.
    neighbors = {"a1": [("a2", 0.99), ("b2", 0.1)], "a2": [("a1", 0.99), ("b2", 0.2)],
                 "b1": [("b2", 0.99), ("a2", 0.1)], "b2": [("a1", 0.1), ("a2", 0.2)]}
    write_run(tmp_path, vectors, ids, neighbors)
    labels = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    result = evaluate_run(str(tmp_path), labels, k=1, sample=10)
    assert result["precision@1_exact"] == 1.0
    assert result["precision@1_published"] == 0.75
    assert result["recall@2"] == 0.875  # b2 lost b1 (1 of 8 true neighbours)
    assert result["coverage"] == 1.0
    assert result["failed_by_reason"] == {"decode:empty": 1}
    table = comparison_table([result], k=1)
    assert "m@1" in table and "0.75" in table


def test_cli_writes_evaluation_json(tmp_path, capsys):
    vectors = np.eye(3, dtype=np.float32)
    write_run(tmp_path, vectors, ["x", "y", "z"],
              {"x": [("y", 0.0), ("z", 0.0)], "y": [("x", 0.0), ("z", 0.0)],
               "z": [("x", 0.0), ("y", 0.0)]})
    labels = tmp_path / "labels.csv"
    labels.write_text("product_id,image,kind\nx,x.jpg,k1\ny,y.jpg,k1\nz,z.jpg,k2\n")
    assert main([f"--run={tmp_path}", f"--labels={labels}", "--label_column=kind",
                 "--k=1"]) == 0
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["label_column"] == "kind" and written["products"] == 3
    assert json.loads(capsys.readouterr().out)["products"] == 3


def test_compare_prints_precision_for_each_label_column(tmp_path, capsys):
    vectors = np.eye(3, dtype=np.float32)
    write_run(tmp_path, vectors, ["x", "y", "z"],
              {"x": [("y", 0.0), ("z", 0.0)], "y": [("x", 0.0), ("z", 0.0)],
               "z": [("x", 0.0), ("y", 0.0)]})
    labels = tmp_path / "labels.csv"
    labels.write_text("product_id,image,kind,group\nx,x.jpg,k1,g\ny,y.jpg,k1,g\n"
                      "z,z.jpg,k2,g\n")
    assert main([f"--compare={tmp_path}", f"--labels={labels}", "--label_column=kind,group",
                 "--k=1"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert "P@1 kind" in header and "P@1 group" in header and "cost" in header
    # x→y and y→x share "kind", z→x does not: 2/3; every product shares "group": 1.0.
    assert "0.6667" in row and "1.0" in row
