"""The worker image's build step (runners/container/prepare_worker.py) leaves a working cache.

Docker images cannot be built here; what the Dockerfile runs can: the step is
run as its own process with cwd outside the repository and an empty cache, and
then a run with that cache must load the verified model without converting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.models.registry import resolve_model
from tests.beam_services import REPO, repo_env

DOCKERFILE = REPO / "runners" / "container" / "Dockerfile"


def test_dockerfile_starts_from_beams_python311_image_and_runs_the_build_step():
    text = DOCKERFILE.read_text()
    beam = next(line for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.startswith("apache-beam=="))
    assert f"FROM apache/beam_python3.11_sdk:{beam.split('==')[1]}" in text
    assert "python -m runners.container.prepare_worker" in text
    assert "SIMILARITY_CACHE_DIR=" in text and "pip install -r requirements.txt" in text


def test_build_step_prepares_a_cache_the_pipeline_loads_without_converting(tmp_path):
    cache = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "runners.container.prepare_worker",
                           "--models=raw_pixels_32"], cwd=tmp_path, capture_output=True,
                          text=True, env=repo_env({"SIMILARITY_CACHE_DIR": str(cache)}),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("prepared raw_pixels_32@")
    entries = sorted(os.listdir(cache))
    assert entries
    before = {p: p.stat().st_mtime_ns for p in Path(cache).rglob("*") if p.is_file()}
    model = resolve_model("raw_pixels_32", cache_dir=str(cache))
    assert model.dim == 3072
    after = {p: p.stat().st_mtime_ns for p in Path(cache).rglob("*") if p.is_file()}
    assert after == before  # loaded from the cache: nothing converted or rewritten


def test_build_step_refuses_an_unknown_model_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "runners.container.prepare_worker",
                           f"--models={tmp_path}/no-such-model"], cwd=tmp_path,
                          capture_output=True, text=True, env=repo_env(), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
