"""Nightly cycle: runs under a root, atomic LATEST, reuse of unchanged images, pruning, kills."""

from __future__ import annotations

import csv
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import ImageOps

from pipeline import publish
from pipeline.run import run
from tests.conftest import REPO, shape_image, write_catalog
from tests.http_fixtures import http_server  # noqa: F401 (fixture)


def _run(catalog, root, model, *extra):
    return run([f"--input={catalog}", f"--output={root}", f"--model={model}", "--top_k=5",
                *extra])


def _files(directory, pattern):
    return {os.path.relpath(p, directory): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(directory, pattern)))}


def _rewrite_manifest(catalog, drop=(), add=()):
    with open(catalog, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["product_id"] not in drop]
    rows.extend(add)
    with open(catalog, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["product_id", "image", "family"])
        writer.writeheader()
        writer.writerows(rows)


def test_incremental_run_reuses_unchanged_and_equals_a_full_rebuild(tmp_path, tiny_model):
    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    first = _run(catalog, root, tiny_model)
    assert first["counts"]["reused"] == 0 and first["reuse"] == "no previous run"
    assert os.path.realpath(root / "LATEST") == os.path.realpath(first["run_dir"])

    # The catalogue changes: one product removed, one added, one image replaced.
    images = tmp_path / "cat" / "images"
    ImageOps.flip(shape_image("bar", (90, 90, 220))).save(images / "p01-1.jpg", quality=92)
    shape_image("disc", (240, 120, 0)).save(images / "new.jpg", quality=92)
    _rewrite_manifest(catalog, drop={"p02-2"},
                      add=[{"product_id": "new", "image": "images/new.jpg", "family": "fx"}])

    second = _run(catalog, root, tiny_model)
    counts = second["counts"]
    assert counts["input"] == 18
    assert (counts["reused"], counts["newly_embedded"], counts["removed"]) == (16, 2, 1)
    assert second["previous_run"] == first["run_dir"]
    assert os.path.realpath(root / "LATEST") == os.path.realpath(second["run_dir"])

    rebuilt = _run(catalog, tmp_path / "fresh", tiny_model, "--full_rebuild")
    assert rebuilt["counts"]["reused"] == 0
    for pattern in ("neighbors/*.jsonl", "similar_products-*.jsonl"):
        assert _files(second["run_dir"], pattern) == _files(rebuilt["run_dir"], pattern)


def test_a_changed_model_is_never_mixed_with_old_features(tmp_path, tiny_model):
    from tests.conftest import export_tiny_model

    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    _run(catalog, root, tiny_model)
    other = export_tiny_model(str(tmp_path / "other_model"), dim=16)
    second = _run(catalog, root, other)
    assert second["counts"]["reused"] == 0
    assert second["reuse"].startswith("the previous run used ")


def test_unchanged_url_image_is_not_downloaded_again(tmp_path, tiny_model, http_server):
    catalog = tmp_path / "urls.csv"
    catalog.write_text(f"product_id,image\na,{http_server.url('image.jpg')}\n"
                       f"b,{http_server.url('photo.png')}\n")
    root = tmp_path / "root"
    args = ("--allow_private_hosts",)
    _run(catalog, root, tiny_model, *args)
    second = _run(catalog, root, tiny_model, *args)
    # image.jpg has an ETag: the conditional request gets 304 and the old embedding
    # is reused; photo.png has no validators, so it is downloaded and hashed again
    # (same bytes, so it is reused as well).
    assert second["counts"]["reused"] == 2
    assert http_server.last_headers["/image.jpg"].get("If-None-Match") == '"jpeg-v1"'


def test_killed_run_leaves_latest_on_the_previous_run(tmp_path, tiny_model, http_server):
    catalog = write_catalog(tmp_path / "cat", copies=12)
    root = tmp_path / "root"
    first = _run(catalog, root, tiny_model, "--keep_runs=2")
    # One image whose server never answers keeps the second run busy until it is killed.
    _rewrite_manifest(catalog, add=[{"product_id": "stalled", "image": http_server.url("hang"),
                                     "family": "x"}])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", f"--input={catalog}", f"--output={root}",
         f"--model={tiny_model}", "--full_rebuild", "--run_id=killed",
         "--allow_private_hosts", "--fetch_timeout=60", "--fetch_total_timeout=60"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = root / "runs" / "killed" / publish.INCOMPLETE
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the run never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()  # marked incomplete, never published
    assert os.path.realpath(root / "LATEST") == os.path.realpath(first["run_dir"])
    assert publish.resolve_run(str(root)) == os.path.realpath(first["run_dir"])

    # The next runs complete, and pruning keeps 2 complete runs and drops the dead one.
    second = _run(catalog, root, tiny_model, "--keep_runs=2")
    third = _run(catalog, root, tiny_model, "--keep_runs=2")
    assert os.path.realpath(root / "LATEST") == os.path.realpath(third["run_dir"])
    remaining = sorted(os.listdir(root / "runs"))
    assert remaining == sorted([os.path.basename(second["run_dir"]),
                                os.path.basename(third["run_dir"])])


def test_verification_refuses_a_run_whose_files_do_not_match(tmp_path, tiny_model):
    catalog = write_catalog(tmp_path / "cat")
    manifest = _run(catalog, tmp_path / "root", tiny_model)
    for path in glob.glob(os.path.join(manifest["run_dir"], "neighbors", "*.jsonl"))[:1]:
        with open(path) as handle:
            lines = handle.readlines()
        with open(path, "w") as handle:
            handle.writelines(lines[1:])
    with pytest.raises(publish.RunVerificationError, match="inconsistent"):
        publish.verify_run(manifest["run_dir"])
