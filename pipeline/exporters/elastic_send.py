"""Send a run's documents to a live Elasticsearch with the official client.

Creates the index with the export's mapping if it does not exist yet, streams the
documents through ``helpers.streaming_bulk`` (429 rejections are retried with
back-off) and counts every per-item result, because ``_bulk`` answers HTTP 200
even when some documents were rejected: a load is only successful when no item
failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elasticsearch import BadRequestError, Elasticsearch, helpers

from pipeline.exporters.elastic import DEFAULT_CHUNK_BYTES, bulk_action, documents, encode_document
from pipeline.exporters.run_data import Run

MAX_REASONS = 5
UNLIMITED_DOCS = 10 ** 9


@dataclass
class SendReport:
    """How a load went: the server, what was sent, and the first few failures."""

    server_version: str | None = None
    created_index: bool = False
    sent: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def connect(url: str, api_key: str | None = None, request_timeout: float = 120.0
            ) -> Elasticsearch:
    """A client for ``url`` (credentials may be in the URL, or an API key)."""
    return Elasticsearch(url, api_key=api_key, request_timeout=request_timeout,
                         retry_on_timeout=True, max_retries=3)


def ensure_index(client: Elasticsearch, index: str, body: dict) -> bool:
    """Create ``index`` with ``body`` unless it exists; True when this call created it.

    An existing index is left as it is (its mapping is the shop's to manage);
    documents that do not fit it fail per item and are reported.
    """
    if client.indices.exists(index=index):
        return False
    try:
        client.indices.create(index=index, settings=body["settings"],
                              mappings=body["mappings"])
    except BadRequestError as exc:  # created meanwhile by a concurrent loader
        if exc.message != "resource_already_exists_exception":
            raise
        return False
    return True


def describe_failure(item: dict) -> str:
    """One line for a failed bulk item: id, HTTP status, error type and reason."""
    result = next(iter(item.values()), {}) if item else {}
    error = result.get("error")
    if isinstance(error, dict):
        cause = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
    else:
        cause = str(error)
    return f"{result.get('_id')}: {result.get('status')} {cause}"


def send_run(client: Elasticsearch, run: Run, index: str, body: dict,
             with_embeddings: bool = False, chunk_docs: int | None = None,
             chunk_bytes: int | None = None) -> SendReport:
    """Index every product of ``run`` into ``index`` and report per-item failures."""
    report = SendReport()
    info = client.info()
    report.server_version = (info.get("version") or {}).get("number")
    report.created_index = ensure_index(client, index, body)
    # Documents are encoded here exactly as in the bulk files; the client passes bytes through.
    actions = ((doc["product_id"], encode_document(doc))
               for doc in documents(run, with_embeddings))
    for ok, item in helpers.streaming_bulk(
            client, actions, expand_action_callback=lambda a: (bulk_action(index, a[0]), a[1]),
            chunk_size=chunk_docs or UNLIMITED_DOCS,
            max_chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
            raise_on_error=False, raise_on_exception=False,
            max_retries=3, initial_backoff=1, max_backoff=30):
        report.sent += 1
        if not ok:
            report.failed += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(describe_failure(item))
    if report.sent:
        client.indices.refresh(index=index)
    return report
