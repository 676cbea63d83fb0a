"""A block of rows' neighbour lists → the bytes of their ``neighbors/`` and flat-pair JSONL lines.

The published contract is one JSON object per line:
``{"product_id":…,"neighbors":[{"product_id":…,"similarity":…},…]}`` for
``neighbors/`` and ``{"similarity":…,"master_pi":…,"similar_pi":…}`` for the
flat pairs, compact, with similarities rounded to 4 decimals. A catalogue of N
products has ~20 N pairs, so building a dict per pair and encoding it cost
more than the neighbour search itself at 500k products. Here the selection
(drop empty slots, the row itself, excluded keys, weaker than
``min_similarity``, cut to ``top_k``) is done on the arrays, each product id
is JSON-encoded once per index, the ≤ 20,001 possible rounded similarities
come from a table, and the lines are joined from those pieces. The bytes are
exactly what ``orjson.dumps`` of the dicts gives (tests compare both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

# Similarities are published with this many decimals.
DECIMALS = 4
_SCALE = 10 ** DECIMALS


@dataclass(frozen=True)
class ShardLines:
    """The JSONL bytes of one block of rows, and what the shard summary counts."""

    neighbors: bytes  # one line per query row
    pairs: bytes  # one line per (row, neighbour)
    rows: int  # query rows written
    pair_count: int  # flat pairs written
    full_lists: int  # rows with min(top_k, count - 1) neighbours
    near_duplicates: list  # (a, b, similarity) with similarity >= the threshold and a < b


NO_LINES = ShardLines(neighbors=b"", pairs=b"", rows=0, pair_count=0, full_lists=0,
                      near_duplicates=[])


def json_strings(values) -> np.ndarray:
    """Each string JSON-encoded (quotes and escapes, as orjson writes it), as an object array."""
    out = np.empty(len(values), dtype=object)
    out[:] = [orjson.dumps(v) for v in values]
    return out


def key_codes(keys) -> np.ndarray:
    """An int64 code per key, equal codes for equal keys; -1 for no key (None or "")."""
    codes: dict = {}
    return np.array([-1 if key in (None, "") else codes.setdefault(key, len(codes))
                     for key in keys], dtype=np.int64)


def rounded_units(sims: np.ndarray) -> np.ndarray:
    """``round(float(s), 4) * 10**4`` as float64 integers (sign kept, so -0.0 stays -0.0).

    ``np.rint(s * 1e4)`` rounds the product, not the exact value; where the
    product lies within 1e-6 of a half the exact decimal rounding (Python's
    ``round``, correctly rounded) decides, so every result equals the old
    per-pair ``round(float(s), 4)``.
    """
    x = np.asarray(sims, dtype=np.float64)
    scaled = x * _SCALE
    units = np.rint(scaled)
    near_half = np.flatnonzero(np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6)
    for i in near_half:
        units.flat[i] = np.rint(round(float(x.flat[i]), DECIMALS) * _SCALE)
        if units.flat[i] == 0 and x.flat[i] < 0:
            units.flat[i] = -0.0
    return units


def _similarity_texts(units: np.ndarray) -> np.ndarray:
    """JSON text of ``units / 10**4`` (as orjson writes the rounded float) per entry."""
    keys, inverse = np.unique(units.view(np.int64), return_inverse=True)  # -0.0 is its own key
    table = np.empty(len(keys), dtype=object)
    table[:] = [orjson.dumps(float(u) / _SCALE) for u in keys.view(np.float64)]
    return table[inverse.reshape(-1)]


def shard_lines(id_json: np.ndarray, product_ids, query_rows: np.ndarray, indices: np.ndarray,
                sims: np.ndarray, top_k: int | None = None, min_similarity: float | None = None,
                exclude_codes: np.ndarray | None = None,
                duplicate_threshold: float | None = None, full_length: int = 0) -> ShardLines:
    """The lines of ``query_rows`` from their candidate ``indices``/``sims`` (best first).

    ``id_json``: :func:`json_strings` of every product id of the index;
    ``product_ids`` the ids themselves (for the near-duplicate pairs).
    Per row, in order: slots with index < 0 and the row itself are skipped,
    so are neighbours whose ``exclude_codes`` equals the row's (codes < 0
    mean "no key"), then neighbours rounding below ``min_similarity``, and
    the list is cut to ``top_k``. ``duplicate_threshold``: pairs at or above
    it (rounded), with ``a < b``, are returned for the near-duplicate groups.
    ``full_length``: a row with at least this many neighbours counts as a full list.
    """
    query_rows = np.asarray(query_rows, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)  # [rows, candidates]
    sims = np.asarray(sims)
    if indices.shape[0] != len(query_rows) or sims.shape != indices.shape:
        raise ValueError("indices and sims must be [len(query_rows), candidates] arrays")
    keep = (indices >= 0) & (indices != query_rows[:, None])
    safe = np.where(keep, indices, 0)
    if exclude_codes is not None:
        own = exclude_codes[query_rows][:, None]
        keep &= ~((own >= 0) & (exclude_codes[safe] == own))
    units = rounded_units(np.where(keep, sims, 0.0))
    if min_similarity is not None:
        # sorted descending, so the old "stop at the first weaker one" drops exactly these
        keep &= units / _SCALE >= min_similarity
    if top_k is not None:
        keep &= np.cumsum(keep, axis=1) <= top_k
    counts = keep.sum(axis=1)
    r_idx, c_idx = np.nonzero(keep)  # row-major: rows in order, neighbours best first
    nbr = indices[r_idx, c_idx]
    kept_units = units[r_idx, c_idx]
    sim_text = _similarity_texts(kept_units)
    masters = id_json[query_rows]
    entries = (b'{"product_id":' + id_json[nbr] + b',"similarity":' + sim_text + b"}"
               if len(nbr) else np.empty(0, dtype=object))
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    entry_list = entries.tolist()
    lines = [b'{"product_id":' + master + b',"neighbors":[' + b",".join(
        entry_list[bounds[i]:bounds[i + 1]]) + b"]}\n" for i, master in enumerate(masters.tolist())]
    pairs = (b'{"similarity":' + sim_text + b',"master_pi":' + masters[r_idx] + b',"similar_pi":'
             + id_json[nbr] + b"}\n") if len(nbr) else np.empty(0, dtype=object)
    near: list = []
    if duplicate_threshold is not None and len(nbr):
        strong = np.flatnonzero(kept_units / _SCALE >= duplicate_threshold)
        for at in strong.tolist():
            a, b = product_ids[query_rows[r_idx[at]]], product_ids[nbr[at]]
            if a < b:
                near.append((a, b, float(kept_units[at]) / _SCALE))
    return ShardLines(neighbors=b"".join(lines), pairs=b"".join(pairs.tolist()),
                      rows=len(query_rows), pair_count=len(nbr),
                      full_lists=int((counts >= full_length).sum()), near_duplicates=near)
