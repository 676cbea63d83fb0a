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

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline import run_layout
from pipeline.features import FEATURE_COLUMNS, feature_row
from transforms.errors import METRICS_NAMESPACE

REUSED = "reused"
# Columns of the previous feature rows that the join carries (not the whole row).
PREVIOUS_COLUMNS = FEATURE_COLUMNS


class ReadPreviousFeatures(beam.PTransform):
    """(product_id, previous feature row) pairs from a run directory's features/."""

    def __init__(self, run_dir: str):
        super().__init__()
        self._pattern = run_layout.feature_shards(run_dir)

    def expand(self, pbegin):
        return (pbegin
                | "ReadParquet" >> beam.io.ReadFromParquet(self._pattern,
                                                           columns=list(PREVIOUS_COLUMNS))
                | "KeyById" >> beam.Map(lambda row: (row["product_id"], row)))


class SplitUnchangedFn(beam.DoFn):
    """Unchanged rows become feature rows at once (``reused``); others go on to decoding."""

    def __init__(self, model_id: str):
        self._model_id = model_id
        self._reused = Metrics.counter(METRICS_NAMESPACE, "reused")

    def process(self, row: dict):
        previous = row.pop("previous", None)
        if row.pop("unchanged", False) and previous is not None:
            self._reused.inc()
            current = dict(row, width=previous["width"], height=previous["height"],
                           sha256=previous["sha256"])
            embedding = np.asarray(previous["embedding"], dtype=np.float32)
            yield pvalue.TaggedOutput(REUSED, feature_row(current, embedding, self._model_id))
            return
        yield row
