"""Write feature rows as Parquet shards: the contract every later stage reads.

Beam's ``WriteToParquet`` writes uncompressed and dictionary-encodes every
column, embeddings included. A dictionary of float vectors never pays off: the
writer builds it, gives up, and readers pay for the fallback pages. Dictionary
encoding only on the string columns, with Snappy compression, measured faster to
write and to read back, and smaller (bench/MEASUREMENTS.md, "Parquet feature
shards"). So the shards go through a small ``FileBasedSink`` of our own (same
temp-file-then-rename protocol, same shard names) with those settings.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes

from pipeline.run_layout import FEATURES_DIR, FEATURES_PREFIX

# Rows per Parquet write call (each call appends a row group).
RECORD_BATCH_ROWS = 256
PARQUET_COMPRESSION = "snappy"


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: strings (ids, model, categories), never vectors."""
    return [f.name for f in schema if pa.types.is_string(f.type)
            or pa.types.is_large_string(f.type)]


class _ParquetRowWriter:
    """Buffers feature rows (the writer's dicts) and appends them to one Parquet file in
    record batches."""

    def __init__(self, handle, schema: pa.Schema):
        self.handle = handle
        self._schema = schema
        self._rows: list[dict] = []
        self._writer = pq.ParquetWriter(handle, schema, compression=PARQUET_COMPRESSION,
                                        use_dictionary=_dictionary_columns(schema))

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= RECORD_BATCH_ROWS:
            self.flush()

    def add_batch(self, batch: pa.RecordBatch) -> None:
        """Append a whole record batch of feature rows (the vectors path's blocks)."""
        self.flush()
        self._writer.write_batch(batch)

    def flush(self) -> None:
        if self._rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()


class FeatureParquetSink(filebasedsink.FileBasedSink):
    """Beam file sink writing :class:`pipeline.features.FeatureRow` records (or blocks) with
    per-column Parquet settings."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, file_name_suffix: str = "",
                 blocks: bool = False):
        super().__init__(file_path_prefix, coder=None, file_name_suffix=file_name_suffix,
                         mime_type="application/x-parquet",
                         # Parquet compresses per column chunk, not the whole file.
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self._schema = schema
        self._blocks = blocks  # values are blocks of rows (``.batch`` in ``schema``)

    def open(self, temp_path):
        return _ParquetRowWriter(super().open(temp_path), self._schema)

    def write_record(self, writer: _ParquetRowWriter, value) -> None:
        if self._blocks:
            writer.add_batch(value.batch)
        else:  # a FeatureRow: its dict for the Parquet writer is made here, at the edge
            writer.add(value.as_parquet_row())

    def close(self, writer: _ParquetRowWriter) -> None:
        writer.close()
        super().close(writer.handle)


class WriteFeatures(beam.PTransform):
    """:class:`FeatureRow` records → ``RUN_DIR/features/features-SSSSS-of-NNNNN.parquet``; yields
    the file names.

    With ``blocks``, each element is a block of feature rows (an Arrow record batch
    in ``schema``, see :mod:`pipeline.vector_blocks`), written as one batch.
    """

    def __init__(self, run_dir: str, schema: pa.Schema, blocks: bool = False):
        super().__init__()
        self._blocks = blocks
        self._prefix = beam.io.filesystems.FileSystems.join(
            run_dir, FEATURES_DIR, FEATURES_PREFIX)
        self._schema = schema

    def expand(self, features):
        return features | "WriteParquet" >> beam.io.Write(
            FeatureParquetSink(self._prefix, self._schema, file_name_suffix=".parquet",
                               blocks=self._blocks))
