"""Read a product catalogue inside the pipeline: the Beam wrappers over :mod:`pipeline.catalog`.

The parsing (the start-up check :func:`pipeline.catalog.inspect_catalog`, the
manifest row reader, CSV/JSONL/Parquet rules) is plain library code in
:mod:`pipeline.catalog`; here are only the DoFn that runs the reader on a worker
and the PTransform that reads a glob or a manifest, so a catalogue of millions
of rows never passes through the launcher's memory.
"""

from __future__ import annotations

import posixpath
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio

from pipeline.catalog import CatalogInfo, ManifestRowReader
from pipeline.records import CatalogRow


class ReadManifestRowsFn(ManifestRowReader, beam.DoFn):
    """Stream the rows of one manifest file as :class:`CatalogRow` records, one file per call.

    A thin DoFn over :class:`pipeline.catalog.ManifestRowReader`; subclasses may
    override the reader's ``_parquet_rows`` (the vectors reader does).
    """

    def process(self, path: str) -> Iterator[CatalogRow]:
        """Every row of the manifest ``path``, usable or not."""
        yield from self.rows(path)


def _glob_row(metadata) -> CatalogRow:
    path = metadata.path
    stem = posixpath.splitext(posixpath.basename(path.replace("\\", "/")))[0]
    return CatalogRow(stem, path, None, {})


class ReadCatalog(beam.PTransform):
    """All catalogue rows (usable or not), as :class:`CatalogRow` records.

    The rows are not reshuffled here: the pipeline groups them by product id
    next (duplicate ids), and that grouping already spreads them across
    workers; a second shuffle would only add a stage.
    """

    def __init__(self, info: CatalogInfo):
        super().__init__()
        self._info = info

    def expand(self, pbegin):
        if self._info.kind == "glob":
            rows = (pbegin
                    | "MatchImages" >> fileio.MatchFiles(self._info.input)
                    | "GlobToRows" >> beam.Map(_glob_row))
        else:
            rows = (pbegin
                    | "ManifestPath" >> beam.Create([self._info.input])
                    | "ReadManifest" >> beam.ParDo(ReadManifestRowsFn(self._info)))
        return rows
