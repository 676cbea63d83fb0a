"""The feature row and the index description: typed inside the pipeline, the same files outside.

A :class:`FeatureRow` must become exactly the Parquet row of the ``features/`` contract,
and an :class:`IndexDescription` exactly the ``meta.json`` the index has always had, so
that runs written before the records were typed still load and compare byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import types

import pyarrow as pa
import pytest

from pipeline import files
from pipeline.catalog import CatalogInfo
from pipeline.features import FEATURE_COLUMNS, FeatureRow, features_schema
from pipeline.index_description import META_KEYS, IndexDescription

MODEL = types.SimpleNamespace(dim=2, model_id="fake@1")
# A manifest column "category", and one called "model" (carried as manifest_model).
CATALOG = CatalogInfo(input="shop.csv", kind="csv",
                      carried=(("category", "category", "string"),
                               ("model", "manifest_model", "string")))


def _row(**changes) -> FeatureRow:
    row = FeatureRow("p1", "p1.jpg", [0.5, 0.25], "fake@1", sha256="s1", width=10, height=20,
                     etag='"e1"', last_modified="Tue, 01 Dec 2026 10:00:00 GMT",
                     extra={"category": "shoes", "manifest_model": "X-1"})
    return dataclasses.replace(row, **changes)


def test_a_feature_row_has_the_contract_columns_as_its_fields_in_order():
    assert [f.name for f in dataclasses.fields(FeatureRow)] == [*FEATURE_COLUMNS, "extra"]


def test_the_parquet_row_is_the_schema_columns_in_order_then_the_carried_ones():
    parquet_row = _row().as_parquet_row()
    schema = features_schema(MODEL, CATALOG)
    assert list(parquet_row) == schema.names == [*FEATURE_COLUMNS, "category", "manifest_model"]
    assert parquet_row["model"] == "fake@1" and parquet_row["manifest_model"] == "X-1"
    batch = pa.RecordBatch.from_pylist([parquet_row], schema=schema)
    assert batch.to_pylist() == [parquet_row]


def test_a_row_read_back_from_features_is_the_row_without_its_carried_columns():
    written = pa.RecordBatch.from_pylist([_row().as_parquet_row()],
                                         schema=features_schema(MODEL, CATALOG)).to_pylist()[0]
    assert FeatureRow.from_parquet_row(written) == _row(extra={})


def test_a_feature_row_is_never_changed_only_replaced():
    row = _row()
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.sha256 = "other"  # type: ignore[misc]
    assert dataclasses.replace(row, sha256="other").sha256 == "other" and row.sha256 == "s1"


# index/meta.json of an IVF partition as the code before IndexDescription wrote it
# (python -m pipeline.run --embedding_column=embedding --partition_by=category on 30k
# vectors of 64 dimensions).
OLD_META = """{
  "annoy_build_seconds": 1.223,
  "build_seconds": 1.358,
  "candidates": 105,
  "count": 22425,
  "dim": 64,
  "files": {
    "annoy": "annoy.ann",
    "ids": "ids.parquet",
    "ivf_centroids": "ivf_centroids.npy",
    "vectors": "vectors.npy"
  },
  "metric": "angular",
  "model": "external",
  "n_trees": 19,
  "partition": "a",
  "query_k": 97,
  "search": "ivf",
  "search_k": 35910,
  "seed": 42,
  "top_k": 20
}
"""


def test_an_old_meta_json_loads_and_is_written_back_byte_for_byte(tmp_path):
    description = IndexDescription.from_meta(json.loads(OLD_META), "/runs/r/index/a-1")
    assert (description.index_dir, description.partition, description.count,
            description.search, description.query_k) == ("/runs/r/index/a-1", "a", 22425,
                                                        "ivf", 97)
    assert description.files == {"annoy": "annoy.ann", "ids": "ids.parquet",
                                 "ivf_centroids": "ivf_centroids.npy", "vectors": "vectors.npy"}
    path = str(tmp_path / "meta.json")
    files.write_json(path, description.as_meta())
    assert open(path, encoding="utf-8").read() == OLD_META


def test_meta_json_keys_keep_the_order_the_index_stage_always_built_them_in():
    description = IndexDescription.from_meta(json.loads(OLD_META))
    assert list(description.as_meta()) == list(META_KEYS) == [
        "model", "partition", "dim", "metric", "n_trees", "seed", "count", "search",
        "search_k", "candidates", "top_k", "query_k", "files", "build_seconds",
        "annoy_build_seconds"]


def test_a_hand_written_meta_json_without_search_settings_still_loads():
    description = IndexDescription.from_meta({"model": "m@1", "dim": 8, "metric": "angular",
                                              "n_trees": 10, "seed": 42, "count": 3})
    assert (description.count, description.dim, description.search, description.files,
            description.partition) == (3, 8, None, None, None)
    assert not description.has_annoy
    with pytest.raises(KeyError):
        IndexDescription.from_meta({"model": "m@1", "dim": 8})
