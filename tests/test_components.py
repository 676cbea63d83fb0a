"""Each Beam stage on its own, fed small fake rows: no model, no TensorFlow, seconds per test.

The end-to-end tests run the whole graph on images; these feed the index, neighbour,
count, manifest, duplicate and reuse transforms hand-made feature rows through Beam's
``TestPipeline`` and check what each stage promises, so a failure names the stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import run_layout, run_reader
from pipeline.catalog import CatalogInfo
from pipeline.features import FeatureRow, features_schema
from pipeline.index_description import META_KEYS
from pipeline.records import CatalogRow, ErrorRecord, FetchedRow
from pipeline.run_config import SearchConfig
from transforms import count_rows
from transforms.build_index import BuildIndex
from transforms.deduplicate import REMOVED, DeduplicateProductIds
from transforms.duplicate_groups import WriteDuplicateGroups, group_pair_blocks
from transforms.errors import ERRORS
from transforms.query_neighbors import QueryNeighbors
from transforms.reuse_previous import REUSED, SplitUnchangedFn
from transforms.write_manifest import WriteManifest

MODEL_ID = "fake@1"
DIM = 8
# The index and neighbour stages' settings in these tests: exact top-3, no duplicate pairs.
EXACT_TOP_3 = SearchConfig(top_k=3, search="exact", duplicate_threshold=None)


def _pairs_of_twins(n_pairs: int) -> tuple[list[str], np.ndarray]:
    """Ids a0, b0, a1, b1…: each b is a slightly moved copy of its a, far from the others."""
    rng = np.random.default_rng(7)
    ids, vectors = [], []
    for i in range(n_pairs):
        base = np.zeros(DIM, np.float32)
        base[i % DIM] = 1.0
        twin = base + rng.normal(0, 0.05, DIM).astype(np.float32)
        ids += [f"a{i}", f"b{i}"]
        vectors += [base, twin / np.linalg.norm(twin)]
    return ids, np.stack(vectors)


def _write_features(directory: str, ids: list[str], vectors: np.ndarray) -> str:
    model = types.SimpleNamespace(dim=DIM, model_id=MODEL_ID)
    schema = features_schema(model, CatalogInfo(input="fake.csv", kind="csv"))
    rows = [FeatureRow(pid, f"{pid}.jpg", vec.tolist(), MODEL_ID, sha256=f"sha-{pid}")
            .as_parquet_row() for pid, vec in zip(ids, vectors)]
    path = os.path.join(directory, run_layout.FEATURES_DIR, "features-00000-of-00001.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_index_and_neighbour_stages_give_each_product_its_twin_first(tmp_path):
    out = str(tmp_path)
    ids, vectors = _pairs_of_twins(4)
    path = _write_features(out, ids, vectors)
    with TestPipeline() as p:
        built = (p | beam.Create([path])
                 | BuildIndex(out, MODEL_ID, EXACT_TOP_3))
        queried = built["planned"] | QueryNeighbors(out, EXACT_TOP_3)
        assert_that(queried["shards"] | beam.Map(lambda s: s["rows"]) | beam.CombineGlobally(sum),
                    equal_to([len(ids)]), label="EveryProductHasAList")
    lists = run_reader.read_neighbor_lists(out)
    assert sorted(lists) == sorted(ids)
    for pid, neighbours in lists.items():
        twin = ("b" if pid[0] == "a" else "a") + pid[1:]
        assert neighbours[0][0] == twin
        assert len(neighbours) == 3 and pid not in [n for n, _ in neighbours]
    meta = json.loads((tmp_path / run_layout.INDEX_DIR / run_layout.META_FILE).read_text())
    assert meta["count"] == len(ids)


def _build_descriptions(out: str, path: str, background: bool) -> list[dict]:
    """Run the index and neighbour stages; the index descriptions the manifest would get."""
    saved = os.path.join(out, "descriptions")
    os.makedirs(saved, exist_ok=True)
    with TestPipeline() as p:
        stage = BuildIndex(out, MODEL_ID, dataclasses.replace(EXACT_TOP_3, n_trees=4),
                           background=background)
        built = p | beam.Create([path]) | stage
        queried = built["planned"] | QueryNeighbors(out, EXACT_TOP_3)
        index = (stage.await_built(built["planned"], queried["shards"]) if background
                 else built["built"])
        _ = index | beam.Map(_save_description, saved)
    return [json.loads(open(os.path.join(saved, name)).read()) for name in os.listdir(saved)]


def _save_description(description, directory: str) -> None:
    with open(os.path.join(directory, f"{description.partition or 'all'}.json"), "w") as f:
        json.dump(dataclasses.asdict(description), f)


def test_background_annoy_build_gives_the_same_index_and_description(tmp_path):
    ids, vectors = _pairs_of_twins(6)
    results = {}
    for background in (False, True):
        out = str(tmp_path / f"background-{background}")
        path = _write_features(out, ids, vectors)
        [description] = _build_descriptions(out, path, background)
        index_dir = os.path.join(out, run_layout.INDEX_DIR)
        annoy = open(os.path.join(index_dir, run_layout.ANNOY_FILE), "rb").read()
        # The description the manifest and the query API get is what meta.json says.
        meta = json.loads(open(os.path.join(index_dir, run_layout.META_FILE)).read())
        assert meta == {key: description[key] for key in META_KEYS}
        timings = ("build_seconds", "annoy_build_seconds", "split_seconds")
        assert all(description[key] >= 0 for key in timings)
        results[background] = ({k: v for k, v in description.items()
                                if k not in timings + ("index_dir",)}, annoy,
                               run_reader.read_neighbor_lists(out))
    assert results[True] == results[False]


def test_a_failing_background_annoy_build_fails_the_run(tmp_path, monkeypatch):
    from pipeline import similarity_search

    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device (test)")

    monkeypatch.setattr(similarity_search, "build_annoy_index", no_space)
    out = str(tmp_path)
    ids, vectors = _pairs_of_twins(3)
    path = _write_features(out, ids, vectors)
    with pytest.raises(Exception, match="No space left on device"):
        _build_descriptions(out, path, background=True)


def test_index_stage_refuses_features_of_another_model(tmp_path):
    out = str(tmp_path)
    ids, vectors = _pairs_of_twins(2)
    path = _write_features(out, ids, vectors)
    with pytest.raises(Exception, match="one index needs one model"):
        with TestPipeline() as p:
            _ = p | beam.Create([path]) | BuildIndex(out, "other@2", EXACT_TOP_3)


def _error(stage: str, reason: str) -> ErrorRecord:
    return ErrorRecord("p", "p.jpg", stage, reason, "a sentence")


def test_count_rows_counts_each_category_and_failures_by_stage_and_reason():
    errors = [_error("decode", "truncated"), _error("read", "http_404"),
              _error("decode", "truncated")]
    with TestPipeline() as p:
        counted = {count_rows.INPUT: p | "In" >> beam.Create(range(5)),
                   count_rows.EMBEDDED: p | "Emb" >> beam.Create(["x", "y"]),
                   count_rows.FAILED: p | "Err" >> beam.Create(errors)} | count_rows.CountRows()
        assert_that(counted, equal_to([(("input",), 5), (("embedded",), 2),
                                       (("failed", "decode", "truncated"), 2),
                                       (("failed", "read", "http_404"), 1)]))


def _manifest_pipeline(out: str, inputs: int, embedded: int, failed: int) -> None:
    with TestPipeline() as p:
        counts = {count_rows.INPUT: p | "In" >> beam.Create(range(inputs)),
                  count_rows.EMBEDDED: p | "Emb" >> beam.Create(range(embedded)),
                  count_rows.FAILED: p | "Err" >> beam.Create(
                      [_error("decode", "corrupt")] * failed)
                  } | count_rows.CountRows()
        no_index = p | "NoIndex" >> beam.Create([])
        no_shards = p | "NoShards" >> beam.Create([])
        _ = (counts, no_index, no_shards) | WriteManifest(out, {"run_id": "t"}, 0.0)


def test_manifest_stage_writes_the_counts_when_every_row_is_accounted_for(tmp_path):
    _manifest_pipeline(str(tmp_path), inputs=4, embedded=3, failed=1)
    manifest = run_reader.read_manifest(str(tmp_path))
    assert manifest["run_id"] == "t"
    assert manifest["counts"]["input"] == 4 and manifest["counts"]["embedded"] == 3
    assert manifest["counts"]["failed_by_reason"] == {"decode:corrupt": 1}
    assert "neighbors" not in manifest  # no index: a features-only run


def test_manifest_stage_refuses_a_run_that_lost_a_row(tmp_path):
    with pytest.raises(Exception, match="lost rows"):
        _manifest_pipeline(str(tmp_path), inputs=4, embedded=2, failed=1)
    assert run_reader.read_manifest(str(tmp_path)) is None


def test_duplicate_stage_groups_identical_bytes_and_near_duplicate_pairs(tmp_path):
    features = [FeatureRow(pid, f"{pid}.jpg", [1.0], MODEL_ID, sha256=sha)
                for pid, sha in (("p1", "s"), ("p2", "s"), ("p3", "t"), ("p4", "u"), ("p5", "v"))]
    with TestPipeline() as p:
        count = ((p | "F" >> beam.Create(features), p | "N" >> beam.Create([[("p3", "p4", 0.97)]]))
                 | WriteDuplicateGroups(str(tmp_path)))
        assert_that(count, equal_to([2]))
    path = tmp_path / run_layout.DUPLICATES_DIR / run_layout.DUPLICATES_FILE
    groups = [json.loads(line) for line in path.read_text().splitlines()]
    assert [g["products"] for g in groups] == [["p1", "p2"], ["p3", "p4"]]
    assert [g["identical_bytes"] for g in groups] == [True, False]


def test_duplicate_groups_do_not_depend_on_how_pairs_are_split_into_blocks():
    pairs = [("p4", "p5", 0.98, None), ("p1", "p2", 1.0, "s"), ("p2", "p3", 0.975, None),
             ("p5", "p6", 0.99, None), ("p1", "p3", 1.0, "s"), ("p7", "p8", 0.97, None)]
    one = group_pair_blocks([pairs])
    assert group_pair_blocks([pairs[3:], [], pairs[:1], pairs[1:3][::-1]]) == one
    assert [(g["products"], g["min_link_similarity"], g["identical_bytes"]) for g in one] == [
        (["p1", "p2", "p3"], 0.975, True), (["p4", "p5", "p6"], 0.98, False),
        (["p7", "p8"], 0.97, False)]
    assert one[0]["same_image_bytes"] == [["p1", "p2", "p3"]]
    assert group_pair_blocks([[]]) == []


def test_reuse_stage_turns_unchanged_rows_into_feature_rows_and_passes_the_rest_on():
    previous = FeatureRow("p1", "old.jpg", [1.0, 0.0], MODEL_ID, sha256="s1", width=10, height=20)
    rows = [FetchedRow("p1", "p1.jpg", {"category": "shoes"}, None, "s1", None, None,
                       unchanged=True, previous=previous),
            FetchedRow("p2", "p2.jpg", {}, b"bytes", "s2", None, None, previous=previous)]
    with TestPipeline() as p:
        split = (p | beam.Create(rows)
                 | beam.ParDo(SplitUnchangedFn(MODEL_ID)).with_outputs(REUSED, main="rest"))
        # A changed row goes on without the previous feature row it no longer needs.
        assert_that(split.rest | beam.Map(lambda r: (r.product_id, r.data, r.previous)),
                    equal_to([("p2", b"bytes", None)]), label="Rest")
        assert_that(split[REUSED] | beam.Map(lambda r: (r.product_id, r.image, r.width,
                                                        r.sha256, r.extra["category"],
                                                        list(r.embedding))),
                    equal_to([("p1", "p1.jpg", 10, "s1", "shoes", [1.0, 0.0])]), label="Reused")


def test_dedup_stage_keeps_the_first_row_joins_the_previous_run_and_reports_removed_ids():
    rows = [CatalogRow("p1", "first.jpg", 0), CatalogRow("p1", "second.jpg", 1),
            CatalogRow("p2", "p2.jpg", 2)]
    previous = [(pid, FeatureRow(pid, f"{pid}.jpg", [1.0], MODEL_ID, sha256=sha))
                for pid, sha in (("p2", "s"), ("gone", "g"))]
    with TestPipeline() as p:
        out = p | "Rows" >> beam.Create(rows) | DeduplicateProductIds(
            p | "Prev" >> beam.Create(previous))
        assert_that(out.rows | beam.Map(lambda r: (r.product_id, r.image,
                                                   r.previous and r.previous.sha256)),
                    equal_to([("p1", "first.jpg", None), ("p2", "p2.jpg", "s")]), label="Kept")
        assert_that(out[ERRORS] | beam.Map(lambda e: (e.product_id, e.reason)),
                    equal_to([("p1", "duplicate_product_id")]), label="Errors")
        assert_that(out[REMOVED], equal_to(["gone"]), label="Removed")


def test_a_stopped_run_waits_for_its_background_build_and_forgets_it(tmp_path, monkeypatch):
    import threading
    import time

    from pipeline import similarity_search
    from transforms import build_index

    release = threading.Event()

    def slow_build(_vectors, path, *_args, **_kwargs):
        release.wait(5)
        time.sleep(0.2)
        with open(path, "wb") as handle:
            handle.write(b"forest")

    monkeypatch.setattr(similarity_search, "build_annoy_index", slow_build)
    out = str(tmp_path)
    ids, vectors = _pairs_of_twins(3)
    path = _write_features(out, ids, vectors)
    with TestPipeline() as p:  # the run stops after starting the build, never awaiting it
        _ = (p | beam.Create([path])
             | BuildIndex(out, MODEL_ID, EXACT_TOP_3, background=True))["planned"]
    meta = tmp_path / run_layout.INDEX_DIR / run_layout.META_FILE
    assert not meta.exists()  # still building
    release.set()
    build_index.settle_background_builds(out)
    assert meta.exists()  # nothing of the run is written after settle returns
    assert not any(key.startswith(out) for key in build_index._BACKGROUND)
