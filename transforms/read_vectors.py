"""Read precomputed vectors instead of images, and turn them into feature rows.

``ReadVectors`` reads the manifest like ``ReadCatalog`` (same row dicts, same
invalid-row handling), with each row's vector checked at once
(:mod:`pipeline.vectors`): a unit float32 vector as bytes, or a reason why not.
After duplicate ids are removed, ``ValidateVectorsFn`` turns each row into a
feature row of the same contract image runs write (sha256 = of the stored
vector's float32 bytes), a read-stage error row, or — when the previous run
stored the same vector for that product — a ``reused`` feature row, so the
nightly counts hold as for images.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems

from pipeline import run_layout, vectors
from pipeline.features import feature_row
from transforms.errors import ERRORS, STAGE_READ, count_failure, error_record
from transforms.read_catalog import CatalogInfo, ReadManifestRowsFn, _column_values

REUSED = "reused"


class ReadVectorRowsFn(ReadManifestRowsFn):
    """Manifest rows with ``vector`` (unit float32 bytes) or ``vector_error`` (reason, text)."""

    def __init__(self, info: CatalogInfo, dim: int):
        super().__init__(info)
        self._dim = dim

    def process(self, path: str):
        for row in super().process(path):
            value = row.pop("vector", None)
            if row.get("invalid") is None:
                if not isinstance(value, (np.ndarray, vectors.VectorError)):
                    value = vectors._checked_or_error(value, self._dim)
                if isinstance(value, vectors.VectorError):
                    row["vector_error"] = (value.reason, value.message)
                else:
                    row["vector"] = value.tobytes()
            yield row

    def _parquet_rows(self, path: str):
        info = self._info
        column = info.embedding_column
        wanted = {info.id_column, info.image_column, *(name for name, _, _ in info.carried)}
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
            row_number = 0
            for batch in parquet.iter_batches(batch_size=10_000):
                index = batch.schema.get_field_index(column)
                checked = vectors.arrow_vectors(batch.column(index), self._dim)
                rest = batch.drop_columns([column])
                cells = {name: _column_values(values)
                         for name, values in zip(rest.schema.names, rest.columns)
                         if name in wanted}
                for i, value in enumerate(checked):
                    row_number += 1
                    raw = {name: values[i] for name, values in cells.items()}
                    raw[column] = value
                    yield f"manifest row {row_number}", raw


class ReadVectors(beam.PTransform):
    """All manifest rows of a vectors catalogue (usable or not)."""

    def __init__(self, info: CatalogInfo, dim: int):
        super().__init__()
        self._info, self._dim = info, dim

    def expand(self, pbegin):
        return (pbegin
                | "ManifestPath" >> beam.Create([self._info.input])
                | "ReadManifest" >> beam.ParDo(ReadVectorRowsFn(self._info, self._dim)))


class ReadPreviousVectorKeys(beam.PTransform):
    """(product_id, {sha256, model}) of the previous run: all reuse needs, without vectors."""

    def __init__(self, run_dir: str):
        super().__init__()
        self._pattern = run_layout.feature_shards(run_dir)

    def expand(self, pbegin):
        return (pbegin
                | "ReadParquet" >> beam.io.ReadFromParquet(
                    self._pattern, columns=["product_id", "sha256", "model"])
                | "KeyById" >> beam.Map(lambda row: (row["product_id"], row)))


class ValidateVectorsFn(beam.DoFn):
    """Checked rows → feature rows (main), ``reused`` feature rows, or read-stage errors."""

    def __init__(self, model_id: str):
        self._model_id = model_id

    def process(self, row: dict):
        previous = row.pop("previous", None)
        problem = row.pop("vector_error", None)
        if problem is not None:
            reason, message = problem
            count_failure(STAGE_READ, reason)
            yield pvalue.TaggedOutput(ERRORS, error_record(row, STAGE_READ, reason, message))
            return
        vector = np.frombuffer(row.pop("vector"), dtype=np.float32)
        current = dict(row, sha256=vectors.vector_sha256(vector), width=None, height=None)
        feature = feature_row(current, vector, self._model_id)
        if (previous is not None and previous.get("sha256") == current["sha256"]
                and previous.get("model") == self._model_id):
            yield pvalue.TaggedOutput(REUSED, feature)
            return
        yield feature


def vector_dim(info: CatalogInfo) -> int:
    """The run's vector length, from the manifest itself (checked once at start-up).

    Parquet: a fixed_size_list's size, else the first valid row's length; CSV
    and JSONL: the first row whose cell parses as a numeric list. Raises
    :class:`CatalogError` when no row holds one.
    """
    from transforms.read_catalog import CatalogError

    dim = None
    if info.kind == "parquet":
        dim = vectors.parquet_dim(info.input, info.embedding_column)
    else:
        for row in ReadManifestRowsFn(info).process(info.input):
            dim = vectors.vector_length(row.get("vector"))
            if dim:
                break
    if not dim:
        raise CatalogError(f"no row of {info.input} holds a vector in column "
                           f"{info.embedding_column!r}; give --embedding_dim or fix the column")
    return dim
