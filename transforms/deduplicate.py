"""One row per product id: the documented rule for duplicate ids in a catalogue.

Rule: the first occurrence wins — the row with the lowest manifest row number
(for an image glob, the lexicographically smallest path). Every other row with
the same id becomes a read-stage error (reason ``duplicate_product_id``) that
names the row that was kept, so nothing is dropped silently and the outcome
does not depend on worker scheduling.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import apache_beam as beam
from apache_beam import pvalue

from pipeline.records import CatalogRow
from pipeline.row_errors import STAGE_READ, error_record
from pipeline.vector_blocks import (
    IMAGE,
    PRODUCT_ID,
    ROW_NUMBER,
    RowBlock,
    keep_first,
    split_by_bucket,
)
from transforms.errors import ERRORS


def _order_key(row: CatalogRow):
    number = row.row_number
    return (number if number is not None else -1, row.image or "")


def _describe(row: CatalogRow) -> str:
    number = row.row_number
    return f"manifest row {number + 1}" if number is not None else str(row.image)


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
            kept = dataclasses.replace(kept, previous=previous[0])
        yield kept
        for dup in rows[1:]:
            yield pvalue.TaggedOutput(ERRORS, error_record(
                dup, STAGE_READ, "duplicate_product_id",
                f"product_id {product_id!r} appears {len(rows)} times in the catalogue; "
                f"kept {_describe(kept)} ({kept.image}), dropped {_describe(dup)}"))


class DeduplicateProductIds(beam.PTransform):
    """Keep one :class:`CatalogRow` per product id; the others go to the ``errors`` output.

    With ``previous`` — (product_id, feature row) pairs of the last good run —
    each kept row is emitted as a new record with its ``previous`` feature row,
    and ids only the previous run had come out on the ``removed`` output.
    """

    def __init__(self, previous=None):
        super().__init__()
        self._previous = previous

    def expand(self, rows):
        keyed = rows | "KeyById" >> beam.Map(lambda row: (row.product_id, row))
        if self._previous is None:
            grouped = keyed | "GroupById" >> beam.GroupByKey()
        else:
            grouped = ({"rows": keyed, "previous": self._previous}
                       | "JoinPrevious" >> beam.CoGroupByKey())
        return grouped | "KeepFirst" >> beam.ParDo(_KeepFirstFn()).with_outputs(
            ERRORS, REMOVED, main="rows")


class _SplitBlockFn(beam.DoFn):
    def __init__(self, buckets: int):
        self._buckets = buckets

    def process(self, block):
        for bucket, part in split_by_bucket(block.batch, PRODUCT_ID, self._buckets):
            yield bucket, RowBlock(part)


class _KeepFirstBlocksFn(beam.DoFn):
    def process(self, keyed):
        _, grouped = keyed
        if isinstance(grouped, dict):  # joined with the previous run's keys
            blocks, previous = list(grouped["rows"]), [b.batch for b in grouped["previous"]]
        else:
            blocks, previous = list(grouped), None
        result = keep_first([b.batch for b in blocks], previous)
        if result.removed:  # in the previous run, no longer in the catalogue
            yield pvalue.TaggedOutput(REMOVED, result.removed)
        if result.rows is None:
            return
        if result.kept.num_rows:
            yield RowBlock(result.kept)
        if not result.duplicates:
            return
        ids, numbers, images = (result.rows.column(c).to_pylist()
                                for c in (PRODUCT_ID, ROW_NUMBER, IMAGE))

        def row(i):
            return CatalogRow(ids[i], images[i], numbers[i])

        for dup, kept, count in result.duplicates:
            kept_row, dup_row = row(kept), row(dup)
            yield pvalue.TaggedOutput(ERRORS, error_record(
                dup_row, STAGE_READ, "duplicate_product_id",
                f"product_id {ids[kept]!r} appears {count} times in the catalogue; "
                f"kept {_describe(kept_row)} ({kept_row.image}), dropped "
                f"{_describe(dup_row)}"))


class DeduplicateBlocks(beam.PTransform):
    """The same rule as :class:`DeduplicateProductIds`, on blocks of rows (vectors path).

    Each block is cut by a hash bucket of the product id and the buckets are
    grouped, so the shuffle moves ``blocks x buckets`` sub-blocks instead of one
    element per row; within a bucket the first occurrence wins as row-wise. With
    ``previous`` — (bucket, block of product_id, sha256, model) of the last good
    run, cut by the same buckets — kept rows carry that run's sha256 and model,
    and the ``removed`` output holds lists of ids only the previous run had.
    """

    def __init__(self, buckets: int, previous=None):
        super().__init__()
        self._buckets = buckets
        self._previous = previous

    def expand(self, blocks):
        keyed = blocks | "KeyByBucket" >> beam.ParDo(_SplitBlockFn(self._buckets)) \
            .with_output_types(Tuple[int, RowBlock])
        if self._previous is None:
            grouped = keyed | "GroupByBucket" >> beam.GroupByKey()
        else:
            grouped = ({"rows": keyed, "previous": self._previous}
                       | "JoinPrevious" >> beam.CoGroupByKey())
        return grouped | "KeepFirst" >> beam.ParDo(_KeepFirstBlocksFn()).with_outputs(
            ERRORS, REMOVED, main="rows")
