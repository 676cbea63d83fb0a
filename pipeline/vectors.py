"""Precomputed embeddings as input ("bring your own vectors"): parse and check one vector.

A manifest may already hold a vector per product (``--embedding_column``), made
elsewhere (for example CLIP on a GPU). Such a run skips fetch, decode and embed;
this module turns one manifest cell into the L2-normalised float32 vector the
``features/`` contract stores, or a short reason code why it cannot:

``null_vector`` (no value), ``not_a_list`` (not an array, or not valid JSON),
``non_numeric`` (array items that are not numbers), ``wrong_length`` (not the
run's dimension), ``non_finite`` (NaN or infinity), ``zero_vector`` (all zeros:
no direction, so no cosine). Plain numpy/pyarrow: no Beam, no model library.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.models.handler import resolve
from pipeline.models.sources import model_source
from pipeline.models.specs import ResolvedModel


class VectorError(ValueError):
    """One cell is not a usable vector; ``reason`` is a short snake_case code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def external_model(model_id: str | None, dim: int) -> ResolvedModel:
    """The model record of a run on precomputed vectors: id from --model_id or 'external'.

    Why through the model source: precomputed vectors are one more kind of source,
    chosen by the same function; theirs has facts only and refuses to run.
    """
    return resolve(model_source(model_id, precomputed_dim=dim))


def _as_array(value) -> np.ndarray:
    if value is None:
        raise VectorError("null_vector", "the embedding cell is empty")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise VectorError("not_a_list",
                              f"the embedding cell is not UTF-8 text ({exc.reason})") from exc
    if isinstance(value, str):
        if not value.strip():
            raise VectorError("null_vector", "the embedding cell is empty")
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise VectorError("not_a_list",
                              "the embedding cell is not a JSON array of numbers") from exc
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (list, tuple)):
        if any(isinstance(v, (bool, str, bytes, list, dict)) or v is None for v in value):
            raise VectorError("non_numeric", "the embedding holds items that are not numbers")
        array = np.asarray(value)
    else:
        raise VectorError("not_a_list", f"the embedding is a {type(value).__name__}, not a list "
                          f"of numbers")
    if array.ndim != 1:
        raise VectorError("not_a_list", f"the embedding has shape {array.shape}, not a flat list")
    if array.dtype.kind not in "fiu":
        raise VectorError("non_numeric", "the embedding holds items that are not numbers")
    return array


def check_vector(value, dim: int) -> np.ndarray:
    """``value`` (list, array, JSON text) as a unit float32 vector of length ``dim``.

    Raises :class:`VectorError` with the row's reason code otherwise; the
    pipeline stores the normalised vector because the features contract says
    embeddings are L2-normalised (cosine = dot product downstream).
    """
    array = _as_array(value)
    if len(array) != dim:
        raise VectorError("wrong_length", f"the embedding has {len(array)} values, the run's "
                          f"dimension is {dim}")
    vector = array.astype(np.float32)
    if not np.isfinite(vector).all():
        raise VectorError("non_finite", "the embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm == 0.0 or not np.isfinite(norm):
        raise VectorError("zero_vector", "the embedding is all zeros (no direction)")
    return (vector / np.float32(norm)).astype(np.float32)


def vector_length(value) -> int | None:
    """Length of ``value`` if it parses as a flat numeric list, else None (dim inference)."""
    try:
        return len(_as_array(value))
    except VectorError:
        return None


def vector_sha256(vector: np.ndarray) -> str:
    """sha256 of the stored vector's float32 bytes: the row's identity for nightly reuse."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").tobytes()).hexdigest()


def parquet_dim(path: str, column: str) -> int | None:
    """The vector length a Parquet manifest declares (fixed_size_list) or its first row shows."""
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
        field = parquet.schema_arrow.field(column)
        if pa.types.is_fixed_size_list(field.type):
            return field.type.list_size
        for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
            for value in batch.column(0).to_pylist():
                length = vector_length(value)
                if length:
                    return length
    return None


def arrow_vectors(column: pa.Array, dim: int) -> list:
    """Check a whole Arrow column at once: per row a unit float32 vector or a VectorError."""
    matrix, problems = arrow_vector_matrix(column, dim)
    return [problem if problem is not None else matrix[i] for i, problem in enumerate(problems)]


def arrow_vector_matrix(column: pa.Array, dim: int) -> tuple[np.ndarray, list]:
    """Check a whole Arrow column at once: ([rows, dim] unit float32, per row None or error).

    The fast path for Parquet ``list``/``large_list``/``fixed_size_list`` of
    numbers: lengths, NaN/inf and zeros are found with array operations instead
    of one Python list per row. Other column types go row by row. Rows with a
    problem hold zeros in the matrix.
    """
    kind = column.type
    n = len(column)
    matrix = np.zeros((n, dim), dtype=np.float32)
    problems: list = [None] * n
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)):
        for i, value in enumerate(column.to_pylist()):
            checked = _checked_or_error(value, dim)
            if isinstance(checked, VectorError):
                problems[i] = checked
            else:
                matrix[i] = checked
        return matrix, problems
    if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        problems = [VectorError("non_numeric", f"the embedding column holds {kind.value_type}, "
                                f"not numbers") if v is not None else
                    VectorError("null_vector", "the embedding cell is empty")
                    for v in column.to_pylist()]
        return matrix, problems
    valid = np.asarray(column.is_valid())
    if pa.types.is_fixed_size_list(kind):
        lengths = np.full(n, kind.list_size)
        starts = (np.arange(n) + column.offset) * kind.list_size
        values = column.values
    else:
        offsets = np.asarray(column.offsets)
        lengths, starts = np.diff(offsets), offsets[:-1]
        values = column.values
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32)
    value_nulls = values.null_count > 0
    good = valid & (lengths == dim)
    rows = np.flatnonzero(good)
    picked = np.zeros((len(rows), dim), dtype=np.float32)
    if len(rows):
        gather = starts[rows][:, None] + np.arange(dim)[None, :]
        picked = flat[gather]
        if value_nulls:
            null_items = ~np.asarray(values.is_valid())[gather]
            picked[null_items] = np.nan
    finite = np.isfinite(picked).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], picked, 0).astype(np.float64), axis=1)
    for i in np.flatnonzero(~valid):
        problems[i] = VectorError("null_vector", "the embedding cell is empty")
    for i in np.flatnonzero(valid & (lengths != dim)):
        problems[i] = VectorError("wrong_length", f"the embedding has {lengths[i]} values, the "
                                  f"run's dimension is {dim}")
    usable = finite & (norms != 0.0)
    for j in np.flatnonzero(~usable):
        problems[rows[j]] = (
            VectorError("non_finite", "the embedding holds NaN, infinite or null values")
            if not finite[j] else
            VectorError("zero_vector", "the embedding is all zeros (no direction)"))
    # The same float32 division the per-vector check does, for all usable rows at once.
    matrix[rows[usable]] = picked[usable] / norms[usable].astype(np.float32)[:, None]
    return matrix, problems


def _checked_or_error(value, dim: int):
    try:
        return check_vector(value, dim)
    except VectorError as exc:
        return exc
