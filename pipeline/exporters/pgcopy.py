"""PostgreSQL binary COPY encoding for ``(text, text, real[])`` embedding rows.

Formatting a million 1280-d vectors as text array literals in Python takes
minutes; the binary COPY format lets numpy lay out every float as a big-endian
``float4`` with its length word in one vectorised step, so loading embeddings
costs about as much as reading them. The layout is PostgreSQL's documented
binary COPY file format (signature, tuples of length-prefixed fields, trailer)
with the ``array_send`` representation of a one-dimensional ``float4`` array.
"""

from __future__ import annotations

import struct
from typing import Iterator, Sequence

import numpy as np

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)  # flags, no header extension
TRAILER = struct.pack("!h", -1)
FLOAT4_OID = 700
_NULL = struct.pack("!i", -1)


def _text_field(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = value.encode("utf-8")
    return struct.pack("!i", len(data)) + data


def embedding_copy_blocks(product_ids: Sequence[str], model: str | None,
                          vectors: np.ndarray, batch: int = 2048) -> Iterator[bytes]:
    """Blocks of a binary COPY stream for ``(product_id, model, embedding real[])``.

    Feed them, in order, to ``copy.write`` of ``COPY … FROM STDIN (FORMAT BINARY)``;
    the first block is the signature and the last the trailer.
    """
    yield SIGNATURE
    count, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
    model_field = _text_field(model)
    # ndim 1, no nulls, element type, length, lower bound 1
    array_header = struct.pack("!iiiii", 1, 0, FLOAT4_OID, dim, 1)
    array_field = struct.pack("!i", len(array_header) + 8 * dim) + array_header
    field_count = struct.pack("!h", 3)
    for start in range(0, count, batch):
        block = vectors[start:start + batch]
        elements = np.empty(block.shape, dtype=[("length", ">i4"), ("value", ">f4")])
        elements["length"] = 4
        elements["value"] = block
        parts = []
        for product_id, row in zip(product_ids[start:start + batch], elements):
            parts += [field_count, _text_field(product_id), model_field, array_field,
                      row.tobytes()]
        yield b"".join(parts)
    yield TRAILER
