"""``pipeline.run.run(argv, test_pipeline=...)``: the job runs on the pipeline a caller passes.

Embedding programs and tests hand ``run()`` Beam's ``TestPipeline`` (its runner,
its options); the whole job — graph, manifest, publish — must run on that
pipeline, not on one ``run()`` builds itself. Precomputed vectors keep it fast
(no TensorFlow).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline.run import run


class RecordingPipeline(TestPipeline):
    """A TestPipeline that counts how often it was run."""

    runs = 0

    def run(self, test_runner_api=True):
        RecordingPipeline.runs += 1
        return super().run(test_runner_api)


def test_run_executes_on_the_test_pipeline_it_is_given(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 4))
    vecs = [(centres[i % 2] + 0.05 * rng.standard_normal(4)).tolist() for i in range(6)]
    manifest = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"product_id": [f"p{i}" for i in range(6)],
                             "embedding": pa.array(vecs, pa.list_(pa.float32()))}), manifest)
    RecordingPipeline.runs = 0
    pipeline = RecordingPipeline()

    m = run([f"--input={manifest}", f"--output={tmp_path / 'out'}",
             "--embedding_column=embedding", "--top_k=2"], test_pipeline=pipeline)

    assert RecordingPipeline.runs == 1
    assert m["counts"]["input"] == 6 and m["counts"]["embedded"] == 6
    run_dir = (tmp_path / "out" / m["run_dir"]).resolve()
    assert (tmp_path / "out" / "LATEST").resolve() == run_dir  # published
    lists = [json.loads(line) for path in sorted((run_dir / "neighbors").glob("*.jsonl"))
             for line in path.read_text().splitlines() if line.strip()]
    by_id = {row["product_id"]: [n["product_id"] for n in row["neighbors"]] for row in lists}
    assert len(by_id) == 6
    for i in range(6):  # the two nearest are the same cluster's (i % 2)
        assert all(int(other[1:]) % 2 == i % 2 for other in by_id[f"p{i}"])
