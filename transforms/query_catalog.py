"""Look up a new catalogue's images against a published run, as a Beam job.

The "new arrivals today" path: the new catalogue goes through the pipeline's
own read, validate, deduplicate, read-bytes, decode and embed transforms with
the run's model, then each worker opens the run's index once
(:class:`pipeline.similarity_index.SimilarityIndex`, shared per process) and
looks the new embeddings up in batches. Outputs: ``neighbors/*.jsonl`` keyed
by the new product ids, ``errors/*.jsonl`` with the pipeline's reasons, and
``query_manifest.json`` written last, only when ``embedded + failed == input``.
"""

from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from pipeline import files
from pipeline.catalog import CatalogInfo
from pipeline.features import FeatureRow
from pipeline.http_fetch import FetchConfig
from pipeline.models.specs import ResolvedModel
from pipeline.run_layout import (
    ERRORS_DIR,
    ERRORS_PREFIX,
    NEIGHBORS_DIR,
    NEIGHBORS_PREFIX,
    QUERY_MANIFEST_FILE,
)
from transforms import count_rows
from transforms.decode import DecodeImageFn
from transforms.deduplicate import DeduplicateProductIds
from transforms.embed import EmbedImages
from transforms.errors import ERRORS, error_line
from transforms.read_bytes import ReadImageBytesFn
from transforms.read_catalog import ReadCatalog
from transforms.validate_rows import SplitInvalidRowsFn

LOOKUP_BATCH = 64


class _IndexHolder:
    def __init__(self, index):
        self.index = index


class LookUpFn(beam.DoFn):
    """A batch of feature rows → one ``{"product_id", "neighbors"}`` record each."""

    def __init__(self, run_dir: str, top_k: int, partition, min_similarity,
                 shared_handle: shared.Shared):
        self._run_dir = run_dir
        self._top_k = top_k
        self._partition = partition
        self._min_similarity = min_similarity
        self._shared = shared_handle
        self._index = None

    def setup(self):
        from pipeline.similarity_index import SimilarityIndex

        run_dir = self._run_dir
        self._index = self._shared.acquire(
            lambda: _IndexHolder(SimilarityIndex.open(run_dir, load_model_now=False)),
            tag=f"similarity-index:{run_dir}").index

    def process(self, rows: list[FeatureRow]):
        vectors = np.stack([np.asarray(r.embedding, dtype=np.float32) for r in rows])
        lists = self._index.query_vectors(vectors, self._top_k, self._partition,
                                          self._min_similarity)
        for row, neighbors in zip(rows, lists):
            yield {"product_id": row.product_id, "image": row.image,
                   "neighbors": neighbors}


def check_counts(tallies, top_k: int, settings: dict, started_at: float) -> dict:
    """The query job's manifest, after checking every input row ended somewhere."""
    counts = count_rows.RunCounts(tallies)
    failures = counts.failures()
    failed = sum(n for _, n in failures)
    embedded, looked_up = counts[count_rows.EMBEDDED], counts["looked_up"]
    if embedded + failed != counts[count_rows.INPUT] or looked_up != embedded:
        raise RuntimeError(f"{counts[count_rows.INPUT]} input rows but {embedded} embedded + "
                           f"{failed} failed ({looked_up} looked up); refusing to write the "
                           f"query manifest")
    return dict(settings, top_k=top_k, counts={
        "input": counts[count_rows.INPUT], "embedded": embedded, "failed": failed,
        "failed_by_reason": {f"{stage}:{reason}": n for (stage, reason), n in failures}},
        wall_seconds=round(time.time() - started_at, 2))


def build_query_graph(p: beam.Pipeline, catalog: CatalogInfo, model: ResolvedModel,
                      run_dir: str, output: str, top_k: int, fetch: FetchConfig,
                      batch_size: int, threads: int, lanes: int, partition=None,
                      min_similarity=None, max_image_pixels: int = 50_000_000,
                      settings: dict | None = None):
    """Add the look-up job to ``p``; returns the PCollection holding its manifest."""
    started_at = time.time()
    rows = p | "ReadCatalog" >> ReadCatalog(catalog)
    valid = rows | "ValidateRows" >> beam.ParDo(SplitInvalidRowsFn()).with_outputs(
        ERRORS, main="rows")
    unique = valid.rows | "DeduplicateIds" >> DeduplicateProductIds()
    read = unique.rows | "ReadBytes" >> beam.ParDo(ReadImageBytesFn(fetch)).with_outputs(
        ERRORS, main="rows")
    decoded = read.rows | "Decode" >> beam.ParDo(
        DecodeImageFn(model.input_size, max_image_pixels)).with_outputs(ERRORS, main="rows")
    embedded = decoded.rows | "Embed" >> EmbedImages(model, batch_size=batch_size,
                                                     threads=threads, lanes=lanes)
    records = (embedded.features
               | "BatchLookUps" >> beam.BatchElements(min_batch_size=1,
                                                      max_batch_size=LOOKUP_BATCH)
               | "LookUp" >> beam.ParDo(LookUpFn(run_dir, top_k, partition, min_similarity,
                                                 shared.Shared())))
    neighbor_files = (records
                      | "NeighborsToJson" >> beam.Map(files.json_line)
                      | "WriteNeighbors" >> beam.io.WriteToText(
                          files.join(output, NEIGHBORS_DIR, NEIGHBORS_PREFIX),
                          file_name_suffix=".jsonl"))
    errors = ((valid[ERRORS], unique[ERRORS], read[ERRORS], decoded[ERRORS], embedded[ERRORS])
              | "AllErrors" >> beam.Flatten())
    error_files = (errors
                   | "ErrorsToJson" >> beam.Map(error_line)
                   | "WriteErrors" >> beam.io.WriteToText(
                       files.join(output, ERRORS_DIR, ERRORS_PREFIX), file_name_suffix=".jsonl"))
    tallies = ({count_rows.INPUT: rows, count_rows.EMBEDDED: embedded.features,
                "looked_up": records, count_rows.FAILED: errors}
               | "CountRows" >> count_rows.CountRows())
    path = files.join(output, QUERY_MANIFEST_FILE)
    settings = dict(settings or {})

    def write(_, tallies, **_written):
        manifest = check_counts(tallies, top_k, settings, started_at)
        files.write_json(path, manifest)
        yield manifest

    return (p
            | "Once" >> beam.Impulse()
            | "WriteManifest" >> beam.FlatMap(
                write, tallies=beam.pvalue.AsList(tallies),
                _neighbors=beam.pvalue.AsList(neighbor_files),
                _errors=beam.pvalue.AsList(error_files)))
