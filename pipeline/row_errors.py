"""Dead-letter records: every input row that cannot be embedded ends here.

A run never crashes on bad input and never drops a row silently: each stage
that can fail turns the row into one record made by :func:`error_record`, and
the pipeline writes them all to ``errors/``. The record is a frozen
:class:`pipeline.records.ErrorRecord`. The bottom layer (the fetcher, the
decoder, the file reader) raises :class:`RowError`; the Beam wrappers in
``transforms/`` catch it, count it (``transforms.errors.count_failure``) and emit
the record on their ``ERRORS`` tagged output.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.locations import redact_location
from pipeline.product_ids import redact_userinfo
from pipeline.records import ErrorRecord

# Stages a row can fail in, in pipeline order.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_EMBED = "embed"
STAGES = (STAGE_READ, STAGE_DECODE, STAGE_EMBED)


class RowError(Exception):
    """A row-level failure with a short machine-readable reason code.

    ``reason`` is a stable snake_case code (``missing_file``, ``http_404``,
    ``truncated``…) used for counting failures by kind; the message is the
    sentence a person reads in ``errors/``.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def error_record(row: Any, stage: str, reason: str, message: str) -> ErrorRecord:
    """Build the dead-letter record for ``row`` that failed in ``stage``.

    ``row`` is a record of :mod:`pipeline.records` (any object with
    ``product_id`` and ``image``) or, on the precomputed-vectors path, a row
    mapping with those keys.

    The record carries what a person needs to find and fix the input: the
    product id, the image location, the stage, a reason code and a sentence.
    The location is stored without URL credentials or inline data: content, and
    the ``user:password@`` of any URL in the sentence is replaced by ``***@``, so
    credentials are never stored in ``errors/``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if isinstance(row, Mapping):
        product_id, image = row.get("product_id"), row.get("image")
    else:
        product_id, image = row.product_id, row.image
    return ErrorRecord(None if product_id is None else str(product_id),
                       redact_location(image), stage, reason, redact_userinfo(message))
