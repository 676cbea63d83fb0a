"""Catalogue reading: start-up checks, the three manifest formats, globs, broken rows."""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.catalog import CatalogError, inspect_catalog, resolve_image
from pipeline.records import CatalogRow
from transforms.deduplicate import DeduplicateProductIds
from transforms.errors import ERRORS
from transforms.read_catalog import ReadCatalog, ReadManifestRowsFn


def rows_of(path, **kwargs):
    info = inspect_catalog(str(path), **kwargs)
    return info, list(ReadManifestRowsFn(info).process(str(path)))


def test_csv_rows_resolve_relative_paths_and_carry_columns(tmp_path):
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("product_id,image,price,width\n"
                        "00042,images/a.jpg,9.99,wide\n"
                        "43,https://cdn.example.com/b.jpg,1.50,narrow\n"
                        "44,/abs/c.jpg,,x\n")
    info, rows = rows_of(manifest)
    assert info.kind == "csv"
    # A manifest column named like an output column is renamed, not overwritten.
    assert [c[1] for c in info.carried] == ["price", "manifest_width"]
    assert rows[0].product_id == "00042"  # ids stay strings: leading zeros kept
    assert rows[0].image == str(tmp_path / "images" / "a.jpg")
    assert rows[1].image == "https://cdn.example.com/b.jpg"
    assert rows[2].image == "/abs/c.jpg"
    assert rows[0].extra == {"price": "9.99", "manifest_width": "wide"}
    assert [r.row_number for r in rows] == [0, 1, 2]
    assert all(r.invalid is None for r in rows)


def test_csv_with_non_utf8_bytes_marks_only_that_row(tmp_path):
    manifest = tmp_path / "catalog.csv"
    manifest.write_bytes(b"product_id,image,name\n1,a.jpg,caf\xe9\n\xff\xfe,b.jpg,x\n3,c.jpg,ok\n")
    _, rows = rows_of(manifest)
    assert len(rows) == 3
    assert rows[0].extra["name"] == "caf\ufffd"  # carried text decoded with a marker
    assert rows[1].invalid[0] == "invalid_utf8"
    assert rows[2].invalid is None


def test_csv_line_with_wrong_cell_count_is_one_marked_row(tmp_path):
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("product_id,image,colour\na,a.jpg,red\nb,b.jpg,dark, red\nc,c.jpg,blue\n")
    _, rows = rows_of(manifest)
    assert [r.product_id for r in rows if r.invalid is None] == ["a", "c"]
    [bad] = [r for r in rows if r.invalid is not None]
    reason, message = bad.invalid
    assert reason == "malformed_csv_row" and "line 3" in message and "4 cells" in message


def test_custom_column_names_and_missing_values(tmp_path):
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("sku,url\nA,a.jpg\n,b.jpg\nC,\n")
    _, rows = rows_of(manifest, id_column="sku", image_column="url")
    assert rows[0].product_id == "A"
    assert rows[1].invalid[0] == "missing_product_id"
    assert rows[2].invalid[0] == "missing_image"


def test_jsonl_rows_and_broken_lines(tmp_path):
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text(json.dumps({"product_id": 7, "image": "x.jpg", "tags": ["a", "b"]})
                        + "\n{not json\n\n" + json.dumps([1, 2]) + "\n")
    info, rows = rows_of(manifest)
    assert info.kind == "jsonl"
    assert rows[0].product_id == "7"
    assert rows[0].extra == {"tags": '["a", "b"]'}
    assert [r.invalid[0] for r in rows[1:]] == ["invalid_json", "invalid_json"]


def test_parquet_keeps_carried_types(tmp_path):
    manifest = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": [1, 2], "image": ["a.jpg", "b.jpg"],
                             "price": [1.5, 2.0]}), manifest)
    info, rows = rows_of(manifest)
    assert info.carried == (("price", "price", "double"),)
    assert rows[1].product_id == "2" and rows[1].extra == {"price": 2.0}


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("product_id,image\n", "no rows"),
    ("id,path\n1,a.jpg\n", "no column 'product_id', 'image'"),
])
def test_unusable_manifest_is_one_clear_error(tmp_path, content, message):
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(content)
    with pytest.raises(CatalogError, match=message):
        inspect_catalog(str(manifest))


def test_missing_manifest_and_empty_glob(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        inspect_catalog(str(tmp_path / "nope.csv"))
    with pytest.raises(CatalogError, match="no file matches"):
        inspect_catalog(str(tmp_path / "*.jpg"))


def test_resolve_image_keeps_urls_and_schemes():
    assert resolve_image("gs://b/x.jpg", "/data") == "gs://b/x.jpg"
    assert resolve_image("img/x.jpg", "gs://bucket/cat") == "gs://bucket/cat/img/x.jpg"


def test_glob_rows_use_file_stem_as_id(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    info = inspect_catalog(str(tmp_path / "*.jpg"))
    with TestPipeline() as p:
        ids = p | ReadCatalog(info) | beam.Map(lambda r: (r.product_id, r.image))
        assert_that(ids, equal_to([("a", str(tmp_path / "a.jpg")),
                                   ("b", str(tmp_path / "b.jpg"))]))


def test_duplicate_ids_keep_first_row_and_report_the_others():
    rows = [
        CatalogRow("x", "/2.jpg", 5, {}),
        CatalogRow("x", "/1.jpg", 1, {}),
        CatalogRow("x", "/3.jpg", 9, {}),
        CatalogRow("y", "/4.jpg", 2, {}),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | DeduplicateProductIds()
        kept = out.rows | "Kept" >> beam.Map(lambda r: (r.product_id, r.row_number))
        errors = out[ERRORS] | "Errs" >> beam.Map(lambda e: (e.product_id, e.image,
                                                             e.stage, e.reason))
        assert_that(kept, equal_to([("x", 1), ("y", 2)]), label="kept")
        assert_that(errors, equal_to([("x", "/2.jpg", "read", "duplicate_product_id"),
                                      ("x", "/3.jpg", "read", "duplicate_product_id")]),
                    label="errors")
