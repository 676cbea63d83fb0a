"""The ``features/`` Parquet contract: its columns, schema and row builder, and its reader.

Every feature row holds the columns of :data:`FEATURE_COLUMNS` (then the carried
manifest columns, flattened in). The embedding stage and nightly reuse emit
:class:`FeatureRow` records; the writer turns each into the dict it takes
(:meth:`FeatureRow.as_parquet_row`) and uses :func:`features_schema`; the index,
the exporters, evaluation and the report read them back with
:func:`read_feature_matrix`. A change to the contract is an edit here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

if TYPE_CHECKING:
    from pipeline.models.registry import ResolvedModel

# The columns the pipeline writes itself, in schema order. A manifest column of the
# same name is carried as ``manifest_<name>`` so it cannot overwrite one of them, and
# nightly reuse reads exactly these from the previous run.
FEATURE_COLUMNS = ("product_id", "image", "embedding", "model", "sha256", "width", "height",
                   "etag", "last_modified")


def features_schema(model: ResolvedModel, catalog: Any) -> pa.Schema:
    """The Parquet schema of ``features/``, with the embedding dimension in its metadata.

    ``catalog`` is the run's catalogue description (``CatalogInfo``): its carried
    columns follow the fixed ones, in manifest order.
    """
    fields = [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image", pa.string()),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # HTTP validators of URL images: the next run asks "changed since?" with them.
        pa.field("etag", pa.string()),
        pa.field("last_modified", pa.string()),
    ]
    fields.extend(catalog.carried_schema_fields())
    metadata = {
        "embedding_dim": str(model.dim),
        "model": model.model_id,
        "normalization": "l2",
    }
    return pa.schema(fields, metadata=metadata)


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One product's feature row: what the embedder and nightly reuse emit, the writer stores.

    The fields are :data:`FEATURE_COLUMNS`, in that order, then ``extra``: the carried
    manifest columns under their feature column names (flattened into the row when
    written). ``embedding`` is the L2-normalised vector (a float32 array, or the list
    a previous run's Parquet row holds). Frozen like the records of
    :mod:`pipeline.records`: a stage that changes a row builds a new one
    (``dataclasses.replace``). It turns into the Parquet writer's dict only at the
    edge, :meth:`as_parquet_row`; a row read back from ``features/`` becomes one
    with :meth:`from_parquet_row`.
    """

    product_id: Any
    image: Any
    embedding: Any
    model: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    etag: str | None = None
    last_modified: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_parquet_row(self) -> dict:
        """The row as the Parquet writer takes it: :data:`FEATURE_COLUMNS` in order, then
        the carried columns flattened in."""
        out = {name: getattr(self, name) for name in FEATURE_COLUMNS}
        out.update(self.extra or {})
        return out

    @classmethod
    def from_parquet_row(cls, row: Mapping[str, Any]) -> FeatureRow:
        """A row read back from ``features/``: its :data:`FEATURE_COLUMNS` (absent ones
        None); other columns are not kept (nightly reuse takes the current manifest's)."""
        values: dict[str, Any] = {name: row.get(name) for name in FEATURE_COLUMNS}
        return cls(**values)


class MixedModelsError(ValueError):
    """Features of different models cannot share one index."""


@dataclass
class FeatureMatrix:
    """All embeddings of a run, one row per product, sorted by product id."""

    product_ids: list[str]
    vectors: np.ndarray  # float32 [N, D], L2-normalised
    model_id: str | None
    columns: dict = field(default_factory=dict)  # other requested columns, row-aligned

    @property
    def count(self) -> int:
        return len(self.product_ids)


def feature_files(features_dir: str) -> list[str]:
    """The Parquet shards under a run's ``features/`` directory, sorted."""
    pattern = FileSystems.join(features_dir, "*.parquet")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _read_table(path: str, columns: list[str]) -> pa.Table:
    # ParquetFile, not pq.read_table: the latter first imports pyarrow.dataset,
    # an import every run would pay for a single-file read
    # (bench/MEASUREMENTS.md, "Parquet feature shards").
    with FileSystems.open(path) as handle:
        return pq.ParquetFile(pa.PythonFile(handle, mode="r")).read(columns=columns)


def read_feature_matrix(paths: list[str], extra_columns=()) -> FeatureMatrix:
    """Load ids and embeddings (and ``extra_columns``) from feature shards, sorted by id.

    Refuses shards whose rows come from more than one model, and duplicate ids,
    because either would make the neighbours meaningless.
    """
    wanted = ["product_id", "embedding", "model"]
    wanted += [c for c in dict.fromkeys(extra_columns) if c not in wanted]
    tables = [_read_table(p, wanted) for p in paths]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return FeatureMatrix([], np.zeros((0, 0), dtype=np.float32), None)
    table = pa.concat_tables(tables)
    models = sorted(set(table.column("model").to_pylist()))
    if len(models) > 1:
        raise MixedModelsError(
            f"features come from {len(models)} models ({', '.join(models)}); one index needs "
            f"one model — re-embed the catalogue with a single --model")
    ids = table.column("product_id").to_pylist()
    embedding = table.column("embedding").combine_chunks()
    # The list values between the first and last offsets, not .flatten(): that
    # loads pyarrow.compute, another import every run would pay
    # (bench/MEASUREMENTS.md, "Parquet feature shards").
    offsets = embedding.offsets
    start, end = (offsets[0].as_py(), offsets[-1].as_py()) if len(embedding) else (0, 0)
    flat = (embedding.values.slice(start, end - start).to_numpy(zero_copy_only=False)
            .astype(np.float32, copy=False))
    dim = flat.size // len(ids) if ids else 0
    if dim * len(ids) != flat.size:
        raise ValueError("feature rows have embeddings of different lengths")
    vectors = flat.reshape(len(ids), dim)
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids_sorted = [ids[i] for i in order]
    duplicates = sorted({a for a, b in zip(ids_sorted, ids_sorted[1:]) if a == b})
    if duplicates:
        raise ValueError(f"duplicate product ids in features: {duplicates[:10]}")
    columns = {name: [values[i] for i in order] for name in extra_columns
               for values in [table.column(name).to_pylist()]}
    return FeatureMatrix(ids_sorted, np.ascontiguousarray(vectors[order]), models[0], columns)
