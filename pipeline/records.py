"""The typed records that flow between the image path's stages.

Each stage of the image path takes one record type and emits the next, the way
Beam's ``PredictionResult`` and RunInference's dead-letter outputs type what
flows between steps, instead of row dicts whose keys come and go:

    CatalogRow  --ReadImageBytesFn-->  FetchedRow  --DecodeImageFn-->  DecodedRow
    (reader, SplitInvalidRowsFn,       (bytes, reuse marks        (pixels, original
     DeduplicateProductIds)             unchanged, previous)       width and height)

``EmbedImages`` turns a ``DecodedRow`` into the feature row of the Parquet contract
(:class:`pipeline.features.FeatureRow`, next to the columns it must match); a row
that fails anywhere becomes an :class:`ErrorRecord` (built by
:func:`pipeline.row_errors.error_record`).

Beam's rule holds: an emitted element is never mutated. The records are frozen, and
a stage that changes a row builds a new record (``dataclasses.replace`` or the
``fetched``/``decoded`` constructors below). They use ``__slots__`` (cheap to build
and to pickle: Beam encodes them with its pickling fallback coder, on every runner)
and live in this plain module so that any worker that can import the pipeline can
decode them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from pipeline.features import FeatureRow


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One catalogue row, usable or not, as the reader emits it.

    ``image`` is resolved (an absolute or FileSystems path, or an http(s) URL);
    ``row_number`` is the 0-based position in the manifest (``None`` for an image
    glob); ``extra`` holds the carried manifest columns under their feature
    column names. ``invalid`` is ``(reason, message)`` for a row that cannot be
    used — it stays in the stream so it is counted and ends in ``errors/``.
    ``vector`` is the raw embedding cell of a precomputed-vectors catalogue.
    ``previous`` is the last good run's feature row of this product id (read back
    with :meth:`pipeline.features.FeatureRow.from_parquet_row`), set by
    ``DeduplicateProductIds`` when a previous run is joined.
    """

    product_id: Any
    image: Any
    row_number: int | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    invalid: tuple[str, str] | None = None
    vector: Any = None
    previous: FeatureRow | None = None

    def fetched(self, data: bytes | None, sha256: str | None, etag: str | None,
                last_modified: str | None, unchanged: bool) -> FetchedRow:
        """The :class:`FetchedRow` of this row once its bytes (or a 304) came back."""
        return FetchedRow(self.product_id, self.image, self.extra, data, sha256, etag,
                          last_modified, unchanged, self.previous)


@dataclass(frozen=True, slots=True)
class FetchedRow:
    """A row with its image bytes read: the read stage's output, the decoder's input.

    ``data`` is ``None`` when the previous embedding is reused (``unchanged``:
    the bytes hash to the previous run's sha256, or the server answered a
    conditional request with 304). ``etag``/``last_modified`` are the HTTP
    validators of a URL image. ``previous`` is carried from the catalogue row so
    the reuse split can re-emit that feature row.
    """

    product_id: Any
    image: Any
    extra: Mapping[str, Any]
    data: bytes | None
    sha256: str | None
    etag: str | None
    last_modified: str | None
    unchanged: bool = False
    previous: FeatureRow | None = None

    def decoded(self, pixels: np.ndarray, width: int, height: int) -> DecodedRow:
        """The :class:`DecodedRow` of these bytes: the pixels instead of the bytes."""
        return DecodedRow(self.product_id, self.image, self.extra, self.sha256, self.etag,
                          self.last_modified, pixels, width, height)


@dataclass(frozen=True, slots=True)
class DecodedRow:
    """A decoded image ready for the model: the decoder's output, the embedder's input.

    ``pixels`` is the letterboxed model input; ``width``/``height`` are the
    original image's size (stored in the feature row).
    """

    product_id: Any
    image: Any
    extra: Mapping[str, Any]
    sha256: str | None
    etag: str | None
    last_modified: str | None
    pixels: np.ndarray
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One dead-letter record: a row that failed, where, and why.

    ``stage`` is one of :data:`pipeline.row_errors.STAGES`, ``reason`` a stable
    snake_case code, ``error`` the sentence a person reads. The location and the
    sentence are already redacted (no credentials); build it with
    :func:`pipeline.row_errors.error_record`. Written to ``errors/`` as
    :meth:`as_dict`, one JSON line each.
    """

    product_id: str | None
    image: Any
    stage: str
    reason: str
    error: str

    def as_dict(self) -> dict:
        """The record as the JSON object of its ``errors/`` line, in field order."""
        return {"product_id": self.product_id, "image": self.image, "stage": self.stage,
                "reason": self.reason, "error": self.error}
