"""Reuse the previous good run's embeddings for images that have not changed.

A nightly catalogue changes a little each day; re-embedding every image is the
expensive part of a run. The previous run's feature rows are joined to the
catalogue by product id (see :mod:`transforms.deduplicate`); the reader marks a
row ``unchanged`` when its bytes hash to the same sha256 (files) or the server
answers a conditional request with 304 (URLs); such rows skip decoding and the
model, and their previous embedding is written again with the current
manifest's columns. Products no longer in the catalogue are dropped.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline import run_layout
from pipeline.features import FEATURE_COLUMNS, FeatureRow
from pipeline.records import FetchedRow
from transforms.errors import METRICS_NAMESPACE

REUSED = "reused"
# Columns of the previous feature rows that the join carries (not the whole row).
PREVIOUS_COLUMNS = FEATURE_COLUMNS


class ReadPreviousFeatures(beam.PTransform):
    """(product_id, previous :class:`FeatureRow`) pairs from a run directory's features/."""

    def __init__(self, run_dir: str):
        super().__init__()
        self._pattern = run_layout.feature_shards(run_dir)

    def expand(self, pbegin):
        return (pbegin
                | "ReadParquet" >> beam.io.ReadFromParquet(self._pattern,
                                                           columns=list(PREVIOUS_COLUMNS))
                | "KeyById" >> beam.Map(lambda row: (row["product_id"],
                                                      FeatureRow.from_parquet_row(row))))


class SplitUnchangedFn(beam.DoFn):
    """Unchanged rows become feature rows at once (``reused``); others go on to decoding.

    Takes :class:`FetchedRow` records. A changed row goes on as a new record
    without its ``previous`` feature row (decoding never needs it, and the
    embedding it holds need not travel further); the input is never changed.
    """

    def __init__(self, model_id: str):
        self._model_id = model_id
        self._reused = Metrics.counter(METRICS_NAMESPACE, "reused")

    def process(self, row: FetchedRow):
        """Emit the reused feature row of an unchanged image, or the row to decode."""
        previous = row.previous
        if row.unchanged and previous is not None:
            self._reused.inc()
            embedding = np.asarray(previous.embedding, dtype=np.float32)
            yield pvalue.TaggedOutput(REUSED, FeatureRow(
                row.product_id, row.image, embedding, self._model_id,
                sha256=previous.sha256, width=previous.width,
                height=previous.height, etag=row.etag, last_modified=row.last_modified,
                extra=row.extra))
            return
        if previous is not None or row.unchanged:
            row = dataclasses.replace(row, previous=None, unchanged=False)
        yield row
