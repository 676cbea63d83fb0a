"""The feature row: typed inside the pipeline, the same ``features/`` rows outside.

A :class:`FeatureRow` must become exactly the Parquet row of the ``features/`` contract.
"""

from __future__ import annotations

import dataclasses
import types

import pyarrow as pa
import pytest

from pipeline.catalog import CatalogInfo
from pipeline.features import FEATURE_COLUMNS, FeatureRow, features_schema

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
