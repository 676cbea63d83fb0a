"""Neighbours a shop can use directly: partitions, exclusions, thresholds, duplicate groups."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil

import pytest

from pipeline.run import UsageError, run
from tests.conftest import FAMILIES, write_catalog


def _jsonl(pattern):
    return [json.loads(line) for path in sorted(glob.glob(pattern)) for line in open(path)
            if line.strip()]


def _families(catalog):
    with open(catalog, newline="") as handle:
        return {r["product_id"]: r["family"] for r in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cat")
    manifest = write_catalog(directory, copies=4)
    # The same photo uploaded twice under another product id.
    shutil.copy(directory / "images" / "p00-0.jpg", directory / "images" / "dup.jpg")
    with open(manifest, "a") as handle:
        handle.write("dup,images/dup.jpg,f0\n")
    return manifest


def _run(catalog, root, model, *extra):
    return run([f"--input={catalog}", f"--output={root}", f"--model={model}", "--top_k=6",
                *extra])


def test_partitioned_neighbours_never_cross_partitions(catalog, tiny_model, tmp_path):
    manifest = _run(catalog, tmp_path, tiny_model, "--partition_by=family")
    family = _families(catalog)
    records = _jsonl(f"{manifest['run_dir']}/neighbors/*.jsonl")
    assert len(records) == len(family)
    for record in records:
        assert record["neighbors"], record
        assert {family[n["product_id"]] for n in record["neighbors"]} == {
            family[record["product_id"]]}
    partitions = json.load(open(f"{manifest['run_dir']}/index/partitions.json"))
    assert len(partitions["partitions"]) == len(FAMILIES)
    assert set(manifest["index"]["partitions"]) == {f"f{i}" for i in range(len(FAMILIES))}


def test_exclude_same_and_min_similarity(catalog, tiny_model, tmp_path):
    manifest = _run(catalog, tmp_path, tiny_model, "--exclude_same=family",
                    "--min_similarity=0.2")
    family = _families(catalog)
    for record in _jsonl(f"{manifest['run_dir']}/neighbors/*.jsonl"):
        own = family[record["product_id"]]
        assert all(family[n["product_id"]] != own for n in record["neighbors"])
        assert all(n["similarity"] >= 0.2 for n in record["neighbors"])
        assert len(record["neighbors"]) <= 6


def test_duplicate_groups_find_identical_uploads(catalog, tiny_model, tmp_path):
    manifest = _run(catalog, tmp_path, tiny_model, "--duplicate_threshold=0.999")
    groups = _jsonl(f"{manifest['run_dir']}/duplicates/*.jsonl")
    with_dup = [g for g in groups if "dup" in g["products"]]
    assert len(with_dup) == 1 and with_dup[0]["same_image_bytes"] == [["dup", "p00-0"]]
    for group in groups:
        assert group["size"] == len(group["products"]) >= 2
        assert group["min_link_similarity"] >= 0.999
    sizes = [g["size"] for g in groups]
    assert sizes == sorted(sizes, reverse=True)
    # At similarity 1 the byte-identical upload is a group of its own.
    exact = _run(catalog, tmp_path / "exact", tiny_model, "--duplicate_threshold=1.0")
    groups = _jsonl(f"{exact['run_dir']}/duplicates/*.jsonl")
    assert [g for g in groups if g["identical_bytes"]] == [
        {"products": ["dup", "p00-0"], "size": 2, "identical_bytes": True,
         "same_image_bytes": [["dup", "p00-0"]], "min_link_similarity": 1.0}]


def test_unknown_partition_column_is_refused_at_start(catalog, tiny_model, tmp_path):
    with pytest.raises(UsageError, match="--partition_by=colour"):
        _run(catalog, tmp_path, tiny_model, "--partition_by=colour")
    assert not os.path.exists(tmp_path / "runs")


def test_pca_search_space_keeps_full_features(catalog, tiny_model, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    manifest = _run(catalog, tmp_path, tiny_model, "--pca_dim=8")
    run_dir = manifest["run_dir"]
    assert np.load(f"{run_dir}/index/vectors.npy").shape[1] == 8
    assert np.load(f"{run_dir}/index/pca_components.npy").shape == (24, 8)
    features = pq.read_table(glob.glob(f"{run_dir}/features/*.parquet"))
    assert len(features.column("embedding")[0]) == 24  # full vectors kept
    family = _families(catalog)
    hits = [family[r["neighbors"][0]["product_id"]] == family[r["product_id"]]
            for r in _jsonl(f"{run_dir}/neighbors/*.jsonl")]
    assert sum(hits) / len(hits) >= 0.9
