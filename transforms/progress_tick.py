"""A pass-through step that counts what flows by, for the live progress display."""

from __future__ import annotations

from typing import Callable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import progress
from pipeline.records import ErrorRecord

# Beam counters of the same counts, for runners whose workers cannot reach the
# launcher's status directory (read from the job's metrics when it ends).
PROGRESS_NAMESPACE = progress.METRICS_NAMESPACE


class CountProgressFn(beam.DoFn):
    """Counts every element under ``name`` (or ``name_of(element)``); outputs nothing.

    Used as a side branch of a PCollection, so the data path itself is unchanged.

    Counts live in the worker process and reach the launcher through
    :mod:`pipeline.progress` status files in ``directory`` (the run's, fixed
    when the graph is built), flushed at the end of every bundle so the last
    bundle's rows are never missing from the final progress line. The same
    counts go to Beam counters in :data:`PROGRESS_NAMESPACE`, which every
    runner reports in the job's metrics.
    """

    def __init__(self, name: str | None = None, name_of: Callable | None = None,
                 directory: str | None = None, weight: Callable | None = None):
        self._name = name
        self._name_of = name_of
        self._directory = directory
        self._weight = weight  # rows one element stands for (a block of rows); else 1
        self._counters: dict = {}

    def setup(self):
        self._counters = {}

    def process(self, element):
        name = self._name if self._name_of is None else self._name_of(element)
        amount = 1 if self._weight is None else int(self._weight(element))
        progress.count(name, amount, directory=self._directory)
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(PROGRESS_NAMESPACE, name)
        counter.inc(amount)

    def finish_bundle(self):
        progress.flush()


def failed_counter(error: ErrorRecord) -> str:
    """The progress counter of an error record: ``failed:<stage>``."""
    return progress.FAILED_PREFIX + str(error.stage)


def count_as(name: str, weight: Callable | None = None) -> beam.ParDo:
    """A side-branch step counting every element as ``name`` (label it at the call).

    ``weight(element)`` is how many rows an element stands for (a block of rows);
    without it each element counts 1.
    """
    return beam.ParDo(CountProgressFn(name, directory=progress.shared_directory(),
                                      weight=weight))


def count_failures() -> beam.ParDo:
    """A side-branch step counting error records by stage."""
    return beam.ParDo(CountProgressFn(name_of=failed_counter,
                                      directory=progress.shared_directory()))
