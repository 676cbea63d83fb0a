"""Count the run's book-keeping categories in one pass, for the manifest.

The manifest needs how many rows came in, were embedded, reused, removed and
failed (by stage and reason). Counting each with its own ``Count.Globally``
adds a combine, a grouping and a default-value stage per count; tagging every
row with its category and counting the tags once costs one grouping for all of
them, which matters on small catalogues where per-stage overhead is a visible
part of the wall time.
"""

from __future__ import annotations

from collections import Counter

import apache_beam as beam

from pipeline.records import ErrorRecord

INPUT = "input"
EMBEDDED = "embedded"
REUSED = "reused"
REMOVED = "removed"
FAILED = "failed"


def failure_key(error: ErrorRecord) -> tuple:
    """The tally key of one error record: (FAILED, stage, reason)."""
    return (FAILED, error.stage, error.reason)


class RunCounts:
    """The counted categories as numbers; a category nobody counted is 0."""

    def __init__(self, tallies):
        self._tallies = Counter(dict((tuple(k), int(v)) for k, v in tallies))

    def __getitem__(self, category: str) -> int:
        return self._tallies[(category,)]

    def failures(self) -> list[tuple[tuple[str, str], int]]:
        """[((stage, reason), count)] of every failure kind seen."""
        return sorted(((k[1], k[2]), v) for k, v in self._tallies.items() if k[0] == FAILED)


class CountRows(beam.PTransform):
    """``{category: PCollection}`` → ``(key, count)`` pairs, one per category seen.

    The key of a plain category is ``(category,)``; error records are keyed by
    ``failure_key`` so failures are counted per stage and reason. ``weights``
    maps a category to a function giving how many rows one element stands for
    (blocks of rows on the precomputed-vectors path); other elements count 1.
    """

    def __init__(self, weights: dict | None = None):
        super().__init__()
        self._weights = dict(weights or {})

    def expand(self, categories: dict):
        tagged = []
        for name, rows in sorted(categories.items()):
            weight = self._weights.get(name)
            if name == FAILED:
                tagged.append(rows | f"Key{name.title()}" >> beam.Map(
                    lambda e: (failure_key(e), 1)))
            elif weight is not None:
                tagged.append(rows | f"Key{name.title()}" >> beam.Map(
                    lambda e, k=(name,), w=weight: (k, int(w(e)))))
            else:
                tagged.append(rows | f"Key{name.title()}" >> beam.Map(
                    lambda _, k=(name,): (k, 1)))
        return (tagged | "AllKeys" >> beam.Flatten()
                | "Count" >> beam.CombinePerKey(sum))
