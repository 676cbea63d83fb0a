"""The shard lines built from arrays are byte for byte the dict-per-pair JSON they replaced."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from pipeline import files
from pipeline.neighbor_lines import json_strings, key_codes, rounded_units, shard_lines


def _reference(product_ids, rows, indices, sims, top_k, min_similarity, exclude_keys):
    """The per-pair rules as the writer applied them before (the contract's definition)."""
    records, flat = [], []
    for row, idx_row, sim_row in zip(rows, indices, sims):
        master = product_ids[row]
        own = exclude_keys[row] if exclude_keys is not None else None
        neighbors = []
        for j, s in zip(idx_row, sim_row):
            if j < 0 or j == row:
                continue
            if own not in (None, "") and exclude_keys[j] == own:
                continue
            similarity = round(float(s), 4)
            if min_similarity is not None and similarity < min_similarity:
                break
            neighbors.append({"product_id": product_ids[j], "similarity": similarity})
            if top_k is not None and len(neighbors) == top_k:
                break
        flat.extend({"similarity": n["similarity"], "master_pi": master,
                     "similar_pi": n["product_id"]} for n in neighbors)
        records.append({"product_id": master, "neighbors": neighbors})
    return (b"".join(orjson.dumps(r) + b"\n" for r in records),
            b"".join(orjson.dumps(r) + b"\n" for r in flat), records, flat)


def _case(seed, n=300, k=24, with_keys=True):
    rng = np.random.default_rng(seed)
    ids = [f"p{i:04d}" for i in range(n)]
    ids[3] = "caf\u00e9 \"quoted\" \\ back"
    ids[5] = "line\u2028sep\u0085next"
    ids[7] = "tab\there"
    ids.sort()
    rows = np.arange(40, 140)
    indices = rng.integers(0, n, size=(len(rows), k))
    indices[rng.random(indices.shape) < 0.05] = -1  # empty slots
    indices[::7, 2] = rows[::7]  # the row itself
    sims = np.sort(rng.uniform(-1, 1, size=indices.shape).astype(np.float32), axis=1)[:, ::-1]
    # exact halves at 4 decimals, tiny negatives (round to -0.0), ties
    sims[0, :4] = np.float32(0.03125), np.float32(0.015625), np.float32(-0.0000001), 0.0
    sims[0] = np.sort(sims[0])[::-1]
    sims[1, 5:9] = sims[1, 5]
    sims[np.isnan(sims)] = 0
    sims = np.where(indices < 0, -np.inf, sims).astype(np.float32)
    keys = [None if i % 5 == 0 else ("" if i % 5 == 1 else f"g{i % 9}") for i in range(n)]
    return ids, rows, indices, sims, (keys if with_keys else None)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_k,min_similarity", [(20, None), (5, 0.25), (None, None), (20, -0.5)])
def test_lines_equal_the_dict_per_pair_json(seed, top_k, min_similarity):
    ids, rows, indices, sims, keys = _case(seed, with_keys=seed % 2 == 0)
    want_nb, want_pairs, records, flat = _reference(ids, rows, indices, sims, top_k,
                                                    min_similarity, keys)
    got = shard_lines(json_strings(ids), ids, rows, indices, sims, top_k, min_similarity,
                      None if keys is None else key_codes(keys), duplicate_threshold=0.5,
                      full_length=top_k or 0)
    assert got.neighbors == want_nb
    assert got.pairs == want_pairs
    assert files.escape_line_breaks(got.neighbors).count(b"\n") == len(rows)
    assert got.rows == len(rows) and got.pair_count == len(flat)
    assert got.full_lists == sum(len(r["neighbors"]) >= (top_k or 0) for r in records)
    assert got.near_duplicates == [(p["master_pi"], p["similar_pi"], p["similarity"])
                                   for p in flat
                                   if p["similarity"] >= 0.5 and p["master_pi"] < p["similar_pi"]]


def test_rounding_matches_python_round_everywhere_it_could_differ():
    rng = np.random.default_rng(0)
    # values whose x * 1e4 lies on or next to a half, plus random ones
    halves = (np.arange(-10000, 10000) + 0.5) / 1e4
    near = np.concatenate([np.nextafter(halves.astype(np.float32), np.float32(2)),
                           np.nextafter(halves.astype(np.float32), np.float32(-2)),
                           halves.astype(np.float32),
                           rng.uniform(-1, 1, 100_000).astype(np.float32),
                           np.float32([-0.00004, -0.0, 0.0, 1.0, -1.0])])
    units = rounded_units(near)
    expected = [round(float(x), 4) for x in near]
    assert [float(u) / 1e4 for u in units] == expected
    assert [orjson.dumps(float(u) / 1e4) for u in units] == [orjson.dumps(e) for e in expected]


def test_empty_rows_and_lists():
    ids = ["a", "b"]
    got = shard_lines(json_strings(ids), ids, np.array([0, 1]), np.array([[-1], [1]]),
                      np.array([[-np.inf], [1.0]], dtype=np.float32), 20)
    assert [json.loads(line) for line in got.neighbors.splitlines()] == [
        {"product_id": "a", "neighbors": []}, {"product_id": "b", "neighbors": []}]
    assert got.pairs == b"" and got.pair_count == 0
    none = shard_lines(json_strings(ids), ids, np.empty(0, np.int64), np.empty((0, 0)),
                       np.empty((0, 0)), 20)
    assert none.neighbors == b"" and none.pairs == b"" and none.rows == 0
