"""One row per product id: the documented rule for duplicate ids in a catalogue.

Rule: the first occurrence wins — the row with the lowest manifest row number
(for an image glob, the lexicographically smallest path). Every other row with
the same id becomes a read-stage error (reason ``duplicate_product_id``) that
names the row that was kept, so nothing is dropped silently and the outcome
does not depend on worker scheduling.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam import pvalue

from pipeline.row_errors import STAGE_READ, error_record
from transforms.errors import ERRORS


def _order_key(row: dict):
    number = row.get("row_number")
    return (number if number is not None else -1, row.get("image") or "")


def _describe(row: dict) -> str:
    number = row.get("row_number")
    return f"manifest row {number + 1}" if number is not None else str(row.get("image"))


REMOVED = "removed"


class _KeepFirstFn(beam.DoFn):
    def process(self, keyed):
        product_id, grouped = keyed
        if isinstance(grouped, dict):  # joined with the previous run's features
            rows, previous = list(grouped["rows"]), list(grouped["previous"])
        else:
            rows, previous = list(grouped), []
        if not rows:  # in the previous run, no longer in the catalogue
            yield pvalue.TaggedOutput(REMOVED, product_id)
            return
        rows = sorted(rows, key=_order_key)
        kept = rows[0]
        if previous:
            kept = dict(kept, previous=previous[0])
        yield kept
        for dup in rows[1:]:
            yield pvalue.TaggedOutput(ERRORS, error_record(
                dup, STAGE_READ, "duplicate_product_id",
                f"product_id {product_id!r} appears {len(rows)} times in the catalogue; "
                f"kept {_describe(kept)} ({kept.get('image')}), dropped {_describe(dup)}"))


class DeduplicateProductIds(beam.PTransform):
    """Keep one row per product id; the others go to the ``errors`` output.

    With ``previous`` — (product_id, feature row) pairs of the last good run —
    each kept row also gets its ``previous`` feature row, and ids only the
    previous run had come out on the ``removed`` output.
    """

    def __init__(self, previous=None):
        super().__init__()
        self._previous = previous

    def expand(self, rows):
        keyed = rows | "KeyById" >> beam.Map(lambda row: (row["product_id"], row))
        if self._previous is None:
            grouped = keyed | "GroupById" >> beam.GroupByKey()
        else:
            grouped = ({"rows": keyed, "previous": self._previous}
                       | "JoinPrevious" >> beam.CoGroupByKey())
        return grouped | "KeepFirst" >> beam.ParDo(_KeepFirstFn()).with_outputs(
            ERRORS, REMOVED, main="rows")
