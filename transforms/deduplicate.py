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

from transforms.errors import ERRORS, STAGE_READ, error_record


def _order_key(row: dict):
    number = row.get("row_number")
    return (number if number is not None else -1, row.get("image") or "")


def _describe(row: dict) -> str:
    number = row.get("row_number")
    return f"manifest row {number + 1}" if number is not None else str(row.get("image"))


class _KeepFirstFn(beam.DoFn):
    def process(self, keyed):
        product_id, rows = keyed
        rows = sorted(rows, key=_order_key)
        kept = rows[0]
        yield kept
        for dup in rows[1:]:
            yield pvalue.TaggedOutput(ERRORS, error_record(
                dup, STAGE_READ, "duplicate_product_id",
                f"product_id {product_id!r} appears {len(rows)} times in the catalogue; "
                f"kept {_describe(kept)} ({kept.get('image')}), dropped {_describe(dup)}"))


class DeduplicateProductIds(beam.PTransform):
    """Keep one row per product id; the others go to the ``errors`` output."""

    def expand(self, rows):
        return (rows
                | "KeyById" >> beam.Map(lambda row: (row["product_id"], row))
                | "GroupById" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(_KeepFirstFn()).with_outputs(ERRORS, main="rows"))
