"""Blocks of precomputed-vector rows: the unit the vectors path carries between stages.

A run on precomputed vectors (``--embedding_column``) moves every manifest row
from the reader to ``features/``. Carried one row per Beam element, the per-
element cost (coders, DoFn calls, a GroupByKey over every row for duplicate
ids) made up most of such a run's time (bench/MEASUREMENTS.md, "Precomputed-vector
blocks"). Here the rows travel in blocks of
about :data:`BLOCK_ROWS`: one Arrow record batch holding the row numbers, ids,
images, the reader's row problems, the checked unit vectors (a
``fixed_size_list<float32, D>`` column) and the carried manifest columns
(prefixed :data:`EXTRA_PREFIX`, so no manifest column name can collide with the
block's own columns).

Duplicate ids are found per hash bucket of the product id
(:func:`bucket_of`): every block is split into one sub-block per bucket, the
buckets are grouped, and :func:`keep_first` applies the catalogue rule (lowest
manifest row wins) inside one bucket. The previous run's keys are split the
same way, so the nightly join is per bucket too. :func:`feature_batch` turns
the kept rows into the ``features/`` record batch of the same contract row-wise
runs write. Plain numpy/pyarrow: no Beam.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import vectors
from pipeline.records import CatalogRow

# Rows per block out of the reader (one Parquet read batch).
BLOCK_ROWS = 10_000
# Rows per duplicate-id bucket the run aims at, and the most buckets it uses: with N
# rows a bucket holds N / buckets rows (all in one worker while it is checked) and
# each reader block is cut into ``buckets`` sub-blocks of BLOCK_ROWS / buckets rows.
BUCKET_ROWS = 20_000
MAX_BUCKETS = 256

# The block's own columns (carried manifest columns follow, named EXTRA_PREFIX + name).
ROW_NUMBER = "row_number"
PRODUCT_ID = "product_id"
IMAGE = "image"
INVALID_REASON = "invalid_reason"  # the reader refused the row (no id, bad UTF-8, ...)
INVALID_MESSAGE = "invalid_message"
VECTOR_REASON = "vector_reason"  # the row's vector is unusable (vectors.VectorError.reason)
VECTOR_MESSAGE = "vector_message"
VECTOR = "vector"  # unit float32 vector; zeros where VECTOR_REASON is set
PREVIOUS_SHA256 = "previous_sha256"  # added by keep_first when a previous run is joined
PREVIOUS_MODEL = "previous_model"
EXTRA_PREFIX = "extra:"

# Columns of a previous run's features that the nightly join needs.
KEY_COLUMNS = ("product_id", "sha256", "model")


@dataclass(frozen=True)
class RowBlock:
    """One block of rows (an Arrow record batch); ``len`` is its row count."""

    batch: pa.RecordBatch

    def __len__(self) -> int:
        return self.batch.num_rows

    def __reduce__(self):
        # Any pickling coder stores the Arrow IPC bytes, never pickled arrays.
        return (block_from_bytes, (block_to_bytes(self),))


def block_to_bytes(block: RowBlock) -> bytes:
    """The block as one Arrow IPC stream (schema + batch): how it crosses a shuffle."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, block.batch.schema) as writer:
        writer.write_batch(block.batch)
    return sink.getvalue().to_pybytes()


def block_from_bytes(data: bytes) -> RowBlock:
    """Inverse of :func:`block_to_bytes`."""
    return RowBlock(concat(list(pa.ipc.open_stream(pa.py_buffer(data)))))


def bucket_count(n_rows: int | None) -> int:
    """How many duplicate-id buckets a run of about ``n_rows`` rows uses (at least 1)."""
    if not n_rows or n_rows <= 0:
        return 1
    return max(1, min(MAX_BUCKETS, math.ceil(n_rows / BUCKET_ROWS)))


def bucket_of(values: list, buckets: int) -> np.ndarray:
    """The bucket of each id (CRC-32 of its UTF-8 text mod ``buckets``): stable across runs
    and processes, unlike Python's salted ``hash``."""
    if buckets == 1:
        return np.zeros(len(values), dtype=np.int64)
    return np.fromiter((zlib.crc32(v.encode("utf-8", "surrogatepass")) % buckets
                        for v in values), dtype=np.int64, count=len(values))


def split_by_bucket(batch: pa.RecordBatch, key_column: str,
                    buckets: int) -> list[tuple[int, pa.RecordBatch]]:
    """``batch`` cut into one sub-batch per bucket of ``key_column`` (empty ones left out)."""
    if batch.num_rows == 0:
        return []
    if buckets == 1:
        return [(0, batch)]
    keys = bucket_of(batch.column(key_column).to_pylist(), buckets)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    out = []
    for rows in np.split(order, bounds):
        out.append((int(keys[rows[0]]), batch.take(pa.array(rows))))
    return out


def _text_column(values: list) -> pa.Array:
    return pa.array(values, type=pa.string())


def rows_block(rows: list[CatalogRow], matrix: np.ndarray, problems: list, carried_fields: list,
               dim: int) -> RowBlock:
    """A block from reader rows (:class:`pipeline.records.CatalogRow`) and their checked vectors.

    ``matrix`` is [len(rows), dim] float32 (any values where a row has a problem);
    ``problems`` holds per row None or a :class:`vectors.VectorError`. A row the reader
    refused (``invalid`` set) keeps that reason and no vector problem.
    """
    invalid = [row.invalid for row in rows]
    reasons: list = [None] * len(rows)
    messages: list = [None] * len(rows)
    bad = np.zeros(len(rows), dtype=bool)
    for i, problem in enumerate(problems):
        if invalid[i] is not None:
            bad[i] = True
        elif problem is not None:
            reasons[i], messages[i] = problem.reason, problem.message
            bad[i] = True
    matrix = np.asarray(matrix, dtype=np.float32).reshape(len(rows), dim)
    if bad.any():
        matrix = matrix.copy()
        matrix[bad] = 0.0
    columns = {
        ROW_NUMBER: pa.array([row.row_number for row in rows], type=pa.int64()),
        PRODUCT_ID: _text_column([row.product_id for row in rows]),
        IMAGE: _text_column([row.image for row in rows]),
        INVALID_REASON: _text_column([None if v is None else v[0] for v in invalid]),
        INVALID_MESSAGE: _text_column([None if v is None else v[1] for v in invalid]),
        VECTOR_REASON: _text_column(reasons),
        VECTOR_MESSAGE: _text_column(messages),
        VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim),
    }
    for field in carried_fields:
        columns[EXTRA_PREFIX + field.name] = pa.array(
            [(row.extra or {}).get(field.name) for row in rows], type=field.type)
    return RowBlock(pa.RecordBatch.from_pydict(columns))


def checked_rows(values: list, dim: int) -> tuple[np.ndarray, list]:
    """Per-cell checks (CSV/JSONL cells, non-list Parquet columns): (matrix, problems)."""
    matrix = np.zeros((len(values), dim), dtype=np.float32)
    problems: list = [None] * len(values)
    for i, value in enumerate(values):
        checked = vectors._checked_or_error(value, dim)
        if isinstance(checked, vectors.VectorError):
            problems[i] = checked
        else:
            matrix[i] = checked
    return matrix, problems


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One batch of all ``batches`` (same schema, at least one), in order."""
    if len(batches) == 1:
        return batches[0]
    return pa.concat_batches(batches)


def vector_matrix(batch: pa.RecordBatch) -> np.ndarray:
    """The block's vectors as a [rows, D] float32 array (a view where Arrow allows)."""
    column = batch.column(VECTOR)
    dim = column.type.list_size
    flat = column.values.slice(column.offset * dim, len(column) * dim)
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(
        len(column), dim)


@dataclass
class KeptRows:
    """What :func:`keep_first` decided for one bucket."""

    kept: pa.RecordBatch  # one row per product id, sorted by id; previous columns when joined
    duplicates: list  # (dropped row index, kept row index, rows with that id) into ``rows``
    rows: pa.RecordBatch  # all rows of the bucket, the indices above point here
    removed: list  # ids only the previous run had, sorted


def keep_first(batches: list[pa.RecordBatch], previous: list[pa.RecordBatch] | None) -> KeptRows:
    """The duplicate-id rule inside one bucket: per id the lowest manifest row is kept.

    Ties on the row number (never in one manifest) fall back to the image, as the
    row-wise rule does. With ``previous`` (batches of :data:`KEY_COLUMNS` of the
    last good run), each kept row gets that run's sha256 and model for its id, and
    ids the previous run had but no row here has are ``removed``.
    """
    rows = concat(batches) if batches else None
    ids = rows.column(PRODUCT_ID).to_pylist() if rows is not None else []
    numbers = rows.column(ROW_NUMBER).to_pylist() if rows is not None else []
    images = rows.column(IMAGE).to_pylist() if rows is not None else []
    order = sorted(range(len(ids)), key=lambda i: (
        ids[i], numbers[i] if numbers[i] is not None else -1, images[i] or ""))
    kept_rows: list[int] = []
    duplicates: list = []
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and ids[order[end]] == ids[order[start]]:
            end += 1
        first = order[start]
        kept_rows.append(first)
        duplicates.extend((order[j], first, end - start) for j in range(start + 1, end))
        start = end
    removed: list = []
    kept = rows.take(pa.array(kept_rows, type=pa.int64())) if rows is not None else None
    if previous is not None:
        known: dict = {}
        for batch in previous:
            for pid, sha, model in zip(*(batch.column(c).to_pylist() for c in KEY_COLUMNS)):
                known.setdefault(pid, (sha, model))
        present = set(ids)
        removed = sorted(pid for pid in known if pid not in present)
        if kept is not None:
            found = [known.get(ids[i]) for i in kept_rows]
            kept = (kept.append_column(PREVIOUS_SHA256, _text_column(
                        [None if f is None else f[0] for f in found]))
                    .append_column(PREVIOUS_MODEL, _text_column(
                        [None if f is None else f[1] for f in found])))
    return KeptRows(kept=kept, duplicates=duplicates, rows=rows, removed=removed)


def feature_batches(block: pa.RecordBatch, model_id: str, schema: pa.Schema):
    """Kept rows → (new feature batch, reused feature batch, [(row index, reason, message)]).

    Rows with a vector problem become the listed errors; the others become
    ``features/`` rows (``sha256`` of the stored vector's float32 bytes, no width or
    height). A row is reused when the joined previous run stored the same sha256 for
    it under the same model, as the row-wise path decides.
    """
    reasons = block.column(VECTOR_REASON).to_pylist()
    messages = block.column(VECTOR_MESSAGE).to_pylist()
    errors = [(i, reason, messages[i]) for i, reason in enumerate(reasons) if reason is not None]
    good = np.asarray([reason is None for reason in reasons], dtype=bool)
    matrix = vector_matrix(block)
    shas: list = [None] * block.num_rows
    for i in np.flatnonzero(good):
        shas[i] = vectors.vector_sha256(matrix[i])
    reused = np.zeros(block.num_rows, dtype=bool)
    if PREVIOUS_SHA256 in block.schema.names:
        before = block.column(PREVIOUS_SHA256).to_pylist()
        models = block.column(PREVIOUS_MODEL).to_pylist()
        reused = good & np.asarray([before[i] is not None and before[i] == shas[i]
                                    and models[i] == model_id for i in range(block.num_rows)],
                                   dtype=bool)
    new = good & ~reused
    return (_features(block, np.flatnonzero(new), shas, model_id, schema),
            _features(block, np.flatnonzero(reused), shas, model_id, schema), errors)


def _features(block: pa.RecordBatch, rows: np.ndarray, shas: list, model_id: str,
              schema: pa.Schema) -> pa.RecordBatch | None:
    if not len(rows):
        return None
    picked = block.take(pa.array(rows, type=pa.int64()))
    n = len(rows)
    vector = picked.column(VECTOR)
    dim = vector.type.list_size
    values = vector.values.slice(vector.offset * dim, n * dim)
    embedding = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), values)
    given = {
        "product_id": picked.column(PRODUCT_ID),
        "image": picked.column(IMAGE),
        "embedding": embedding,
        "model": pa.array([model_id] * n, type=pa.string()),
        "sha256": pa.array([shas[i] for i in rows], type=pa.string()),
    }
    arrays = []
    for field in schema:
        if field.name in given:
            array = given[field.name]
        elif EXTRA_PREFIX + field.name in picked.schema.names:
            array = picked.column(EXTRA_PREFIX + field.name)
        else:  # width, height, etag, last_modified: nothing to say for a given vector
            array = pa.nulls(n, type=field.type)
        arrays.append(array.cast(field.type) if array.type != field.type else array)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
