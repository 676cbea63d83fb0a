"""Elasticsearch: ``_bulk`` NDJSON files and the index mapping for a finished run.

Each product becomes one document whose ``_id`` is the product id, so loading
the same (or a newer) run again overwrites documents instead of duplicating
them. The files are ready for ``curl --data-binary @bulk-00000.ndjson
-H 'Content-Type: application/x-ndjson' $ES/_bulk``: pairs of action and
document lines, every file ending with a newline, none over the chunk limit.
``export.json`` is written last and lists the files, so its presence means the
export is complete. Sending them with the official client is
:mod:`pipeline.exporters.elastic_send`.

Loading only adds and replaces documents: a product that left the catalogue
keeps its old document until it is deleted (or the run is loaded into a fresh
index and an alias switched to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import orjson
from apache_beam.io.filesystems import FileSystems

from pipeline import files
from pipeline.exporters.run_data import (
    Run,
    RunDataError,
    check_product_id,
    embedding_rows,
    iter_neighbor_lists,
    read_embeddings,
)

DEFAULT_INDEX = "similar_products"
DEFAULT_CHUNK_DOCS = 5000
# Elasticsearch's default http.max_content_length: a bigger file could not be sent as is.
DEFAULT_CHUNK_BYTES = 100 * 1024 * 1024
MAPPING_FILE = "mapping.json"
EXPORT_FILE = "export.json"
BULK_PATTERN = "bulk-*.ndjson"


def index_body(dim: int | None, with_embeddings: bool) -> dict:
    """Settings and mappings for ``PUT /<index>`` (the content of ``mapping.json``).

    ``neighbors`` is ``nested`` so a query can match a neighbour's id and
    similarity together; ``dynamic: strict`` makes a document that does not fit
    (e.g. embeddings sent to an index created without them) fail loudly instead
    of being mapped by guess.
    """
    properties = {
        "product_id": {"type": "keyword"},
        "model": {"type": "keyword"},
        "neighbors": {
            "type": "nested",
            "properties": {
                "product_id": {"type": "keyword"},
                "similarity": {"type": "float"},
            },
        },
    }
    if with_embeddings:
        if not dim:
            raise RunDataError("the run's manifest has no embedding dimension ('dim')")
        properties["embedding"] = {"type": "dense_vector", "dims": int(dim), "index": True,
                                   "similarity": "cosine"}
    return {
        "settings": {"index": {"number_of_shards": 1}},
        "mappings": {"dynamic": "strict", "properties": properties},
    }


def documents(run: Run, with_embeddings: bool) -> Iterator[dict]:
    """One document per product, in the run's order, optionally with its embedding."""
    matrix = rows = None
    if with_embeddings:
        matrix = read_embeddings(run)
        rows = embedding_rows(matrix)
    for product_id, neighbors in iter_neighbor_lists(run):
        doc = {"product_id": product_id, "model": run.model, "neighbors": neighbors}
        if matrix is not None:
            row = rows.get(product_id)
            if row is None:
                raise RunDataError(f"product {product_id!r} has neighbours but no embedding")
            doc["embedding"] = matrix.vectors[row]  # float32, written exactly by orjson
        yield doc


def encode_document(doc: dict) -> bytes:
    """A document as compact UTF-8 JSON, one line.

    orjson writes a float32 embedding with the shortest digits that read back
    as the same float32 — exact, about 12 bytes a component, and faster than
    formatting floats with the standard library (bench/MEASUREMENTS.md, "JSON
    encoding").
    """
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def bulk_action(index: str, product_id: str) -> dict:
    """The ``_bulk`` action for a product: index (create or replace) under its own id.

    The ``_id`` is the product id itself, never hashed: an id over
    Elasticsearch's 512-byte limit (or with a control character) is refused
    with :class:`RunDataError`; the pipeline already refuses such ids at read
    time (``product_id_too_long``), so only a run made before that rule can hit it.
    """
    check_product_id(product_id, f"the document _id {product_id[:40]!r}…"
                     if isinstance(product_id, str) and len(product_id) > 40
                     else f"the document _id {product_id!r}")
    return {"index": {"_index": index, "_id": product_id}}


def bulk_pair(index: str, doc: dict) -> bytes:
    """The action line and document line for one document, each ending in a newline.

    Raw U+0085/U+2028/U+2029 are written as ``\\u`` escapes, so only ``\\n``
    ends a line of the NDJSON whatever splits it.
    """
    return files.escape_line_breaks(orjson.dumps(bulk_action(index, doc["product_id"]))
                                    + b"\n" + encode_document(doc) + b"\n")


def chunk_pairs(pairs: Iterable[bytes], max_docs: int | None,
                max_bytes: int | None) -> Iterator[list[bytes]]:
    """Group action/document pairs into chunks of at most ``max_docs`` and ``max_bytes``.

    A single pair larger than ``max_bytes`` cannot be sent in any request that
    size, so it is an error rather than an oversized file.
    """
    chunk: list[bytes] = []
    size = 0
    for pair in pairs:
        if max_bytes is not None and len(pair) > max_bytes:
            raise RunDataError(f"one document needs {len(pair)} bytes, more than the "
                               f"--chunk_bytes limit of {max_bytes}")
        full = ((max_docs is not None and len(chunk) >= max_docs)
                or (max_bytes is not None and size + len(pair) > max_bytes))
        if chunk and full:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += len(pair)
    if chunk:
        yield chunk


@dataclass
class BulkExport:
    """What :func:`write_bulk_files` wrote."""

    out_dir: str
    index: str
    documents: int = 0
    files: list[str] = field(default_factory=list)
    largest_file_bytes: int = 0


def _clear_previous(out_dir: str) -> None:
    """Remove a previous export's marker and chunks so no stale file is loaded with ours."""
    marker = files.join(out_dir, EXPORT_FILE)
    if FileSystems.exists(marker):
        FileSystems.delete([marker])
    stale = [m.path for m in FileSystems.match([files.join(out_dir, BULK_PATTERN)])[0]
             .metadata_list]
    if stale:
        FileSystems.delete(stale)


def write_bulk_files(run: Run, out_dir: str, index: str = DEFAULT_INDEX,
                     chunk_docs: int | None = DEFAULT_CHUNK_DOCS,
                     chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
                     with_embeddings: bool = False) -> BulkExport:
    """Write ``bulk-NNNNN.ndjson`` chunks, ``mapping.json`` and, last, ``export.json``."""
    body = index_body(run.dim, with_embeddings)
    files.makedirs(out_dir)
    _clear_previous(out_dir)
    result = BulkExport(out_dir=out_dir, index=index)
    pairs = (bulk_pair(index, doc) for doc in documents(run, with_embeddings))
    for number, chunk in enumerate(chunk_pairs(pairs, chunk_docs, chunk_bytes)):
        name = f"bulk-{number:05d}.ndjson"
        data = b"".join(chunk)
        files.write_bytes(files.join(out_dir, name), data)
        result.files.append(name)
        result.documents += len(chunk)
        result.largest_file_bytes = max(result.largest_file_bytes, len(data))
    files.write_json(files.join(out_dir, MAPPING_FILE), body)
    files.write_json(files.join(out_dir, EXPORT_FILE), {
        "index": index,
        "documents": result.documents,
        "files": result.files,
        "mapping": MAPPING_FILE,
        "with_embeddings": with_embeddings,
        "chunk_docs": chunk_docs,
        "chunk_bytes": chunk_bytes,
        "run": {"path": run.path, "run_id": run.run_id, "model": run.model, "dim": run.dim,
                "top_k": run.top_k, "finished_at": run.finished_at},
    })
    return result
