"""The best test we have: the real job on 4,765 real product photos, with the default model.

Runs DirectRunner with two worker processes, as a user would on this machine,
and checks the contract and the quality users judge the product by: are a
product's neighbours the same kind of product? Skips when ../shared is absent.
"""

from __future__ import annotations

import glob
import json

import pytest

from pipeline.evaluate import evaluate_run, read_labels
from pipeline.run import run
from tests.conftest import SHARED_PRODUCTS

CATALOG = SHARED_PRODUCTS / "catalog.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CATALOG.exists(), reason="../shared/data/products is not present"),
]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("products")
    manifest = run([f"--input={CATALOG}", f"--output={out}", "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing"])
    return manifest["run_dir"], manifest


def test_every_product_has_twenty_neighbours(real_run):
    out, manifest = real_run
    n_rows = sum(1 for _ in open(CATALOG)) - 1
    assert manifest["counts"]["input"] == n_rows == 4765
    assert manifest["counts"]["embedded"] == n_rows
    assert manifest["counts"]["failed"] == 0
    lines = [json.loads(line) for path in sorted(glob.glob(f"{out}/neighbors/*.jsonl"))
             for line in open(path)]
    assert len(lines) == n_rows
    assert all(len(r["neighbors"]) == 20 for r in lines)
    flat = sum(1 for path in glob.glob(f"{out}/similar_products-*.jsonl") for _ in open(path))
    assert flat == 20 * n_rows


def test_neighbours_are_the_same_kind_of_product(real_run):
    out, _ = real_run
    labels = read_labels(str(CATALOG), "articleType")
    result = evaluate_run(out, labels, k=10, sample=2000)
    # EfficientNet-Lite0 scores about 0.75 here; raw pixels about 0.6. A broken
    # model or a broken neighbour stage lands well below 0.7.
    assert result["precision@10_published"] >= 0.7, result
    assert result["recall@20"] >= 0.99, result
    assert result["coverage"] == 1.0
