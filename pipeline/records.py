"""The typed records that flow between the pipeline's stages.

A row that fails anywhere becomes an :class:`ErrorRecord` (built by
:func:`pipeline.row_errors.error_record`) on its stage's dead-letter output, the
way RunInference's dead-letter outputs type what they carry, instead of a dict.

Beam's rule holds: an emitted element is never mutated. The records are frozen
and use ``__slots__`` (cheap to build and to pickle: Beam encodes them with its
pickling fallback coder, on every runner); they live in this plain module so
that any worker that can import the pipeline can decode them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
