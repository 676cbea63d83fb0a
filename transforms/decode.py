"""Decode each row's image bytes in the pipeline: the thin Beam wrapper over pipeline.image_decode.

The decoding itself (formats, colour, orientation, letterboxing, the reason codes of
undecodable bytes) is :func:`pipeline.image_decode.decode_image`; this DoFn applies it
to each row and sends failures to the dead-letter output.
"""

from __future__ import annotations

from typing import Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline.image_decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.records import FetchedRow
from pipeline.row_errors import STAGE_DECODE, error_record
from transforms.errors import ERRORS, METRICS_NAMESPACE, count_failure


class DecodeImageFn(beam.DoFn):
    """Decode each :class:`FetchedRow` into a :class:`DecodedRow`.

    The new record holds ``pixels``, ``width`` and ``height`` instead of the
    bytes, and carries the rest of the row. Rows whose bytes cannot be decoded
    go to the ``ERRORS`` output as one dead-letter record each.
    """

    def __init__(self, size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self._size = size
        self._max_pixels = max_pixels
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "decoded")

    def process(self, row: FetchedRow) -> Iterator:
        """Decode one row; emit its decoded record, or its error on ERRORS."""
        try:
            decoded = decode_image(row.data or b"", self._size, self._max_pixels)
        except DecodeError as exc:
            count_failure(STAGE_DECODE, exc.reason)
            yield pvalue.TaggedOutput(ERRORS, error_record(row, STAGE_DECODE, exc.reason,
                                                           exc.message))
            return
        self._decoded.inc()
        yield row.decoded(decoded.pixels, decoded.width, decoded.height)
