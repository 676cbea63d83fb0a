"""A pass-through step that counts what flows by, for the live progress display."""

from __future__ import annotations

from typing import Callable

import apache_beam as beam

from pipeline import progress


class CountProgressFn(beam.DoFn):
    """Counts every element under ``name`` (or ``name_of(element)``); outputs nothing.

    Used as a side branch of a PCollection, so the data path itself is unchanged.

    Counts live in the worker process and reach the launcher through
    :mod:`pipeline.progress` status files, flushed at the end of every bundle so
    the last bundle's rows are never missing from the final progress line.
    """

    def __init__(self, name: str | None = None, name_of: Callable | None = None):
        self._name = name
        self._name_of = name_of

    def process(self, element):
        progress.count(self._name if self._name_of is None else self._name_of(element))

    def finish_bundle(self):
        progress.flush()


def failed_counter(error: dict) -> str:
    """The progress counter of an error record: ``failed:<stage>``."""
    return progress.FAILED_PREFIX + str(error.get("stage", "unknown"))


def count_as(name: str) -> beam.ParDo:
    """A side-branch step counting every element as ``name`` (label it at the call)."""
    return beam.ParDo(CountProgressFn(name))


def count_failures() -> beam.ParDo:
    """A side-branch step counting error records by stage."""
    return beam.ParDo(CountProgressFn(name_of=failed_counter))
