"""Route catalogue rows the reader marked unusable to the dead-letter output."""

from __future__ import annotations

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline.records import CatalogRow
from pipeline.row_errors import STAGE_READ, error_record
from transforms.errors import ERRORS, METRICS_NAMESPACE, count_failure


class SplitInvalidRowsFn(beam.DoFn):
    """Pass usable :class:`CatalogRow` records on; turn those with ``invalid`` set into errors.

    The reader keeps broken rows (no id, no image, bad encoding, bad JSON, an
    id the id rule refuses, a broken CSV record) in the stream so they are
    counted as input; this is where they leave it. The error record never
    carries the ``user:password@`` of a URL (:func:`error_record` removes it).
    """

    def __init__(self):
        self._rows = Metrics.counter(METRICS_NAMESPACE, "input_rows")

    def process(self, row: CatalogRow):
        """Count the row as input; emit it as is, or its read-stage error record."""
        self._rows.inc()
        invalid = row.invalid
        if invalid is None:
            yield row
            return
        reason, message = invalid
        count_failure(STAGE_READ, reason)
        yield pvalue.TaggedOutput(ERRORS, error_record(row, STAGE_READ, reason, message))
