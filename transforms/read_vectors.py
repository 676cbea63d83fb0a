"""Read precomputed vectors instead of images, in blocks, and turn them into feature rows.

The rows of a vectors manifest travel in blocks (:mod:`pipeline.vector_blocks`:
one Arrow record batch of ~10k rows with the checked unit vectors), not one
Beam element per row. ``ReadVectors`` reads the manifest with the rules of
``ReadCatalog`` (same ids, images, carried columns, invalid-row reasons), each
block's vectors checked at once (:mod:`pipeline.vectors`). ``SplitInvalidBlockRowsFn``
sends the rows the reader refused to ``errors``; duplicate ids are then removed
per hash bucket (``transforms.deduplicate.DeduplicateBlocks``), and
``ValidateVectorBlocksFn`` turns each kept block into a feature batch of the
same contract image runs write (sha256 = of the stored vector's float32 bytes),
read-stage error rows, or — when the previous run stored the same vector for
that product — a ``reused`` feature batch, so the nightly counts hold as for
images.
"""

from __future__ import annotations

from typing import Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam import coders, pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import run_layout, vector_blocks, vectors
from pipeline.catalog import (
    CatalogError,
    CatalogInfo,
    ManifestRowReader,
    _column_values,
    _manifest_dir,
)
from pipeline.row_errors import STAGE_READ, error_record
from pipeline.vector_blocks import RowBlock
from transforms.errors import ERRORS, METRICS_NAMESPACE, count_failure
from transforms.read_catalog import ReadManifestRowsFn

REUSED = "reused"


class RowBlockCoder(coders.Coder):
    """A :class:`RowBlock` as its Arrow IPC stream: no pickle between stages."""

    def encode(self, value: RowBlock) -> bytes:
        return vector_blocks.block_to_bytes(value)

    def decode(self, encoded: bytes) -> RowBlock:
        return vector_blocks.block_from_bytes(encoded)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return RowBlock


coders.registry.register_coder(RowBlock, RowBlockCoder)


def block_size(block: RowBlock) -> int:
    """How many rows a block counts for (progress and manifest counts weigh blocks by it)."""
    return len(block)


class ReadVectorBlocksFn(ReadManifestRowsFn):
    """One manifest file → blocks of its rows (:func:`vector_blocks.rows_block`), in order."""

    def __init__(self, info: CatalogInfo, dim: int, block_rows: int | None = None):
        super().__init__(info)
        self._dim = dim
        self._block_rows = block_rows or vector_blocks.BLOCK_ROWS
        self._fields = info.carried_schema_fields()

    def process(self, path: str):
        if self._info.kind == "parquet":
            yield from self._parquet_blocks(path)
            return
        rows: list = []
        for row in super().process(path):
            rows.append(row)
            if len(rows) >= self._block_rows:
                yield self._block(rows)
                rows = []
        if rows:
            yield self._block(rows)

    def _block(self, rows: list) -> RowBlock:
        matrix, problems = vector_blocks.checked_rows([row.vector for row in rows],
                                                      self._dim)
        return vector_blocks.rows_block(rows, matrix, problems, self._fields, self._dim)

    def _parquet_blocks(self, path: str):
        info = self._info
        column = info.embedding_column
        wanted = {info.id_column, info.image_column, *(name for name, _, _ in info.carried)}
        base = _manifest_dir(path)
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
            row_number = 0
            for batch in parquet.iter_batches(batch_size=self._block_rows):
                index = batch.schema.get_field_index(column)
                matrix, problems = vectors.arrow_vector_matrix(batch.column(index), self._dim)
                rest = batch.drop_columns([column])
                cells = {name: _column_values(values)
                         for name, values in zip(rest.schema.names, rest.columns)
                         if name in wanted}
                rows = []
                for i in range(batch.num_rows):
                    raw = {name: values[i] for name, values in cells.items()}
                    rows.append(self._to_row(row_number, f"manifest row {row_number + 1}",
                                             raw, base))
                    row_number += 1
                yield vector_blocks.rows_block(rows, matrix, problems, self._fields, self._dim)


class ReadVectors(beam.PTransform):
    """All manifest rows of a vectors catalogue (usable or not), as blocks."""

    def __init__(self, info: CatalogInfo, dim: int):
        super().__init__()
        self._info, self._dim = info, dim

    def expand(self, pbegin):
        return (pbegin
                | "ManifestPath" >> beam.Create([self._info.input])
                | "ReadManifest" >> beam.ParDo(ReadVectorBlocksFn(self._info, self._dim))
                .with_output_types(RowBlock))


class SplitInvalidBlockRowsFn(beam.DoFn):
    """The block form of ``SplitInvalidRowsFn``: refused rows → read-stage errors."""

    def __init__(self):
        self._rows = Metrics.counter(METRICS_NAMESPACE, "input_rows")

    def process(self, block: RowBlock):
        batch = block.batch
        self._rows.inc(batch.num_rows)
        reasons = batch.column(vector_blocks.INVALID_REASON)
        if reasons.null_count == len(reasons):
            yield block
            return
        reasons_list = reasons.to_pylist()
        messages = batch.column(vector_blocks.INVALID_MESSAGE).to_pylist()
        ids = batch.column(vector_blocks.PRODUCT_ID).to_pylist()
        images = batch.column(vector_blocks.IMAGE).to_pylist()
        keep = []
        for i, reason in enumerate(reasons_list):
            if reason is None:
                keep.append(i)
                continue
            count_failure(STAGE_READ, reason)
            yield pvalue.TaggedOutput(ERRORS, error_record(
                {"product_id": ids[i], "image": images[i]}, STAGE_READ, reason, messages[i]))
        if keep:
            yield RowBlock(batch.take(pa.array(keep, type=pa.int64())))


class _ReadKeyBlocksFn(beam.DoFn):
    def __init__(self, buckets: int):
        self._buckets = buckets

    def process(self, path: str):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
            for batch in parquet.iter_batches(batch_size=vector_blocks.BLOCK_ROWS,
                                              columns=list(vector_blocks.KEY_COLUMNS)):
                for bucket, part in vector_blocks.split_by_bucket(
                        batch, "product_id", self._buckets):
                    yield bucket, RowBlock(part)


def _feature_paths(pattern: str) -> list:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


class ReadPreviousVectorKeys(beam.PTransform):
    """(bucket, block of product_id, sha256, model) of the previous run: all reuse needs."""

    def __init__(self, run_dir: str, buckets: int):
        super().__init__()
        self._pattern = run_layout.feature_shards(run_dir)
        self._buckets = buckets

    def expand(self, pbegin):
        return (pbegin
                | "Pattern" >> beam.Create([self._pattern])
                | "MatchShards" >> beam.FlatMap(_feature_paths)
                | "ReadKeys" >> beam.ParDo(_ReadKeyBlocksFn(self._buckets))
                .with_output_types(Tuple[int, RowBlock]))


class ValidateVectorBlocksFn(beam.DoFn):
    """Kept blocks → feature blocks (main), ``reused`` feature blocks, or read-stage errors."""

    def __init__(self, model_id: str, schema: pa.Schema):
        self._model_id = model_id
        self._schema = schema

    def process(self, block: RowBlock):
        batch = block.batch
        new, reused, errors = vector_blocks.feature_batches(batch, self._model_id, self._schema)
        if errors:
            ids = batch.column(vector_blocks.PRODUCT_ID).to_pylist()
            images = batch.column(vector_blocks.IMAGE).to_pylist()
            tally: dict = {}
            for i, reason, message in errors:
                tally[reason] = tally.get(reason, 0) + 1
                yield pvalue.TaggedOutput(ERRORS, error_record(
                    {"product_id": ids[i], "image": images[i]}, STAGE_READ, reason, message))
            for reason, amount in sorted(tally.items()):
                count_failure(STAGE_READ, reason, amount)
        if reused is not None:
            yield pvalue.TaggedOutput(REUSED, RowBlock(reused))
        if new is not None:
            yield RowBlock(new)


def vector_dim(info: CatalogInfo) -> int:
    """The run's vector length, from the manifest itself (checked once at start-up).

    Parquet: a fixed_size_list's size, else the first valid row's length; CSV
    and JSONL: the first row whose cell parses as a numeric list. Raises
    :class:`CatalogError` when no row holds one.
    """

    dim = None
    if info.kind == "parquet":
        dim = vectors.parquet_dim(info.input, info.embedding_column)
    else:
        for row in ManifestRowReader(info).rows(info.input):
            dim = vectors.vector_length(row.vector)
            if dim:
                break
    if not dim:
        raise CatalogError(f"no row of {info.input} holds a vector in column "
                           f"{info.embedding_column!r}; give --embedding_dim or fix the column")
    return dim


def estimated_rows(info: CatalogInfo, dim: int) -> int | None:
    """About how many rows the manifest holds, to size the duplicate-id buckets.

    Parquet: the row count its footer states. CSV/JSONL: the file size over a
    rough 8 bytes per vector value (a guess is enough; it only sets how many
    buckets the rows are spread over). None when the size cannot be read.
    """
    try:
        if info.kind == "parquet":
            with FileSystems.open(info.input) as handle:
                return pq.ParquetFile(pa.PythonFile(handle, mode="r")).metadata.num_rows
        size = FileSystems.match([info.input])[0].metadata_list[0].size_in_bytes
    except Exception:  # noqa: BLE001 - no estimate only means one bucket per ~guess
        return None
    return max(1, size // max(1, 8 * dim))
