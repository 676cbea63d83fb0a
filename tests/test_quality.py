"""Quality profiles (issue 20): each profile's run keeps the contract.

features/ hold the backbone vectors; index/ holds the search space the recipe
makes from them, named in manifest.json and index/space.json; lists are sorted by
the cosine in that space; an incremental run equals a full rebuild; the query API
applies the run's stored whitening and DBA counterpart.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import postprocess
from pipeline.quality import PROFILES, recipe_for
from pipeline.run import run
from pipeline.similarity_index import SimilarityIndex
from tests.conftest import write_catalog

TOP_K = 5


def _publish(catalog, root, model, *extra):
    manifest = run([f"--input={catalog}", f"--output={root}", f"--model={model}",
                    f"--top_k={TOP_K}", "--search=exact", "--no_progress", *extra])
    return os.path.realpath(os.path.join(str(root), "LATEST")), manifest


def _backbone(run_dir):
    table = pq.read_table(sorted(glob.glob(f"{run_dir}/features/*.parquet")))
    order = np.argsort(table.column("product_id").to_pylist(), kind="stable")
    ids = [table.column("product_id").to_pylist()[i] for i in order]
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)[order]
    return ids, vectors


def _lists(run_dir):
    out = {}
    for path in sorted(glob.glob(f"{run_dir}/neighbors/neighbors-*.jsonl")):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            out[record["product_id"]] = record["neighbors"]
    return out


def _outputs(run_dir) -> dict:
    """Every byte a user reads from a run, except manifest.json (timings, run ids)."""
    found = {}
    for sub in ("neighbors", "index"):
        for path in sorted(glob.glob(f"{run_dir}/{sub}/**/*", recursive=True)):
            if os.path.isfile(path) and not path.endswith("meta.json"):
                found[os.path.relpath(path, run_dir)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_catalog(tmp_path_factory.mktemp("quality_catalog"))


@pytest.fixture(scope="module")
def balanced_run(catalog, tiny_model, tmp_path_factory):
    return _publish(catalog, tmp_path_factory.mktemp("balanced"), tiny_model,
                    "--quality=balanced")


def test_recipes_are_fixed_and_knobs_override_single_fields():
    assert not PROFILES["fast"].postprocessed
    assert recipe_for("balanced") == PROFILES["balanced"]
    changed = recipe_for("balanced", dba_k=0, whiten_dim=None)
    assert changed.dba_k == 0 and changed.whiten_dim == PROFILES["balanced"].whiten_dim
    with pytest.raises(ValueError, match="--quality"):
        recipe_for("ultra")
    with pytest.raises(ValueError, match="--dba_k"):
        recipe_for("fast", dba_k=-1)


def test_whitening_and_dba_are_deterministic_unit_vectors():
    rng = np.random.default_rng(3)
    vectors = postprocess.unit_rows(rng.normal(size=(60, 12)))
    a = postprocess.fit_whitening(vectors, 8, power=0.5, shrinkage=0.1)
    b = postprocess.fit_whitening(vectors.copy(), 8, power=0.5, shrinkage=0.1)
    assert np.array_equal(a.projection, b.projection) and a.projection.shape == (12, 8)
    space = postprocess.database_augmentation(postprocess.apply_whitening(vectors, a), 3)
    assert np.allclose(np.linalg.norm(space, axis=1), 1.0, atol=1e-5)
    # A vector's augmented self is closer to its own neighbours than before.
    assert space.shape == (60, 8)


def test_fast_is_todays_default_path_byte_for_byte(catalog, tiny_model, tmp_path):
    default, _ = _publish(catalog, tmp_path / "default", tiny_model)
    fast, manifest = _publish(catalog, tmp_path / "fast", tiny_model, "--quality=fast")
    assert _outputs(default) == _outputs(fast)
    assert manifest["quality"]["profile"] == "fast"
    assert not os.path.exists(f"{fast}/index/space.json")


def test_balanced_index_holds_the_search_space_of_the_backbone_vectors(balanced_run):
    run_dir, manifest = balanced_run
    recipe = PROFILES["balanced"]
    assert manifest["quality"]["profile"] == "balanced"
    assert manifest["quality"]["similarity"] == recipe.similarity_definition()
    space = json.load(open(f"{run_dir}/index/space.json"))
    ids, backbone = _backbone(run_dir)
    assert space["backbone_dim"] == backbone.shape[1] == manifest["dim"]
    whitening = postprocess.fit_whitening(backbone, recipe.whiten_dim, recipe.whiten_power,
                                          recipe.whiten_shrinkage)
    want = postprocess.database_augmentation(postprocess.apply_whitening(backbone, whitening),
                                             recipe.dba_k, recipe.dba_alpha)
    stored = np.load(f"{run_dir}/index/vectors.npy")
    index_ids = pq.read_table(f"{run_dir}/index/ids.parquet").column("product_id").to_pylist()
    assert index_ids == ids and stored.shape == want.shape == (len(ids), space["dim"])
    assert np.allclose(stored, want, atol=1e-5)
    # Lists are sorted by, and report, the cosine in that space.
    row = {pid: i for i, pid in enumerate(ids)}
    for pid, neighbors in _lists(run_dir).items():
        sims = [n["similarity"] for n in neighbors]
        assert sims == sorted(sims, reverse=True)
        for n in neighbors:
            assert n["similarity"] == pytest.approx(
                float(stored[row[pid]] @ stored[row[n["product_id"]]]), abs=2e-4)


def test_balanced_incremental_run_equals_full_rebuild(catalog, tiny_model, tmp_path):
    root = tmp_path / "nightly"
    _publish(catalog, root, tiny_model, "--quality=balanced")
    again, manifest = _publish(catalog, root, tiny_model, "--quality=balanced")
    assert manifest["counts"]["reused"] > 0
    full, _ = _publish(catalog, tmp_path / "full", tiny_model, "--quality=balanced",
                       "--full_rebuild")
    assert _outputs(again) == _outputs(full)


def test_query_api_applies_the_runs_recipe(balanced_run, catalog):
    run_dir, _ = balanced_run
    index = SimilarityIndex.open(run_dir)
    assert index.info.quality == "balanced"
    ids, backbone = _backbone(run_dir)
    image_dir = os.path.dirname(str(catalog))
    lists = _lists(run_dir)
    stored = np.load(f"{run_dir}/index/vectors.npy")
    recipe = PROFILES["balanced"]
    whitening = postprocess.Whitening(np.load(f"{run_dir}/index/whitening_mean.npy"),
                                      np.load(f"{run_dir}/index/whitening_projection.npy"))
    for i in (0, len(ids) // 2):
        # A new vector goes through the run's stored whitening, then is averaged with its
        # dba_k nearest search vectors, like the catalogue's own vectors were.
        query = postprocess.apply_whitening(backbone[i:i + 1], whitening)
        want = postprocess.query_expansion(query, stored, recipe.dba_k, recipe.dba_alpha)
        assert np.allclose(index._to_search_space(backbone[i:i + 1]), want, atol=1e-5)
        # A catalogue product's own image finds itself and (mostly) its precomputed list.
        image = glob.glob(f"{image_dir}/images/{ids[i]}.*")[0]
        found = [n["product_id"] for n in index.query_image(image, k=TOP_K + 1)]
        assert ids[i] in found
        want_list = {n["product_id"] for n in lists[ids[i]]}
        assert len(set(found) & want_list) >= TOP_K - 1
