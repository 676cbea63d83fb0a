"""The Beam side of dead-letter records: the tagged output and the failure metrics.

The records themselves (:class:`pipeline.row_errors.RowError`,
:func:`pipeline.row_errors.error_record`, the stage names) are plain library code
in the bottom layer; this module holds only what a DoFn needs to emit and count
them.
"""

from __future__ import annotations

from pipeline import files
from pipeline.records import ErrorRecord

# Tag of the dead-letter output of every DoFn that can fail.
ERRORS = "errors"

# Namespace of every Beam metric the pipeline reports.
METRICS_NAMESPACE = "similarity"


def count_failure(stage: str, reason: str, amount: int = 1) -> None:
    """Count a failed row in Beam metrics as ``<stage>_failed_<reason>``."""
    from apache_beam.metrics import Metrics

    Metrics.counter(METRICS_NAMESPACE, f"{stage}_failed_{reason}").inc(amount)


def error_line(error: ErrorRecord) -> str:
    """The ``errors/*.jsonl`` line of one dead-letter record (its fields, in order)."""
    return files.json_line(error.as_dict())
