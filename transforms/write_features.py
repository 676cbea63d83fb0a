"""Write feature rows as Parquet shards: the contract every later stage reads."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from pipeline.models.registry import ResolvedModel
from transforms.read_catalog import CatalogInfo

FEATURES_DIR = "features"
FEATURES_PREFIX = "features"


def features_schema(model: ResolvedModel, catalog: CatalogInfo) -> pa.Schema:
    """The Parquet schema of ``features/``, with the embedding dimension in its metadata."""
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


class WriteFeatures(beam.PTransform):
    """Feature rows → ``OUT/features/features-SSSSS-of-NNNNN.parquet``; yields the file names."""

    def __init__(self, output_dir: str, schema: pa.Schema):
        super().__init__()
        self._prefix = beam.io.filesystems.FileSystems.join(
            output_dir, FEATURES_DIR, FEATURES_PREFIX)
        self._schema = schema

    def expand(self, features):
        return features | "WriteParquet" >> beam.io.WriteToParquet(
            self._prefix, schema=self._schema, file_name_suffix=".parquet",
            record_batch_size=256)
