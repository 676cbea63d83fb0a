"""The job on Beam's portable runner gives DirectRunner's outputs, byte for byte.

A local job service and an EXTERNAL worker pool run on 127.0.0.1 in their own
processes (tests/beam_services.py); workers unpickle and run every DoFn
themselves, as on a distributed runner. A full run and an incremental second
run are compared with the same runs on DirectRunner.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.run import run
from tests.beam_services import BeamPortableServices
from tests.conftest import FAMILIES, shape_image, write_catalog

COMPARED = ("neighbors", "duplicates", "errors")


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Job service + EXTERNAL worker pool, stopped after this module."""
    with BeamPortableServices(tmp_path_factory.mktemp("beam-services")) as started:
        yield started


def _text_files(run_dir: Path) -> dict[str, bytes]:
    found = {}
    for sub in COMPARED:
        for path in sorted((run_dir / sub).glob("*")):
            found[f"{sub}/{path.name}"] = path.read_bytes()
    for path in sorted(run_dir.glob("similar_products-*.jsonl")):
        found[path.name] = path.read_bytes()
    return found


def _features(run_dir: Path):
    table = pq.read_table(run_dir / "features")
    return table.sort_by("product_id").to_pylist()


def assert_same_outputs(direct: Path, portable: Path) -> None:
    """Neighbours, pairs, duplicates and errors byte-identical; feature rows equal."""
    expected, got = _text_files(direct), _text_files(portable)
    assert sorted(got) == sorted(expected)
    assert any(name.startswith("neighbors/") for name in got)
    for name in expected:
        assert got[name] == expected[name], name
    assert _features(portable) == _features(direct)


def test_portable_runner_matches_direct_runner_on_full_and_incremental_runs(tmp_path, services):
    catalog = write_catalog(tmp_path / "catalog", bad={"bad-1": b"not an image"})
    common = [f"--input={catalog}", "--model=raw_pixels_32", "--top_k=5"]
    direct_root, portable_root = tmp_path / "direct", tmp_path / "portable"

    first = run(common + [f"--output={direct_root}", "--run_id=r1"])
    got = run(common + [f"--output={portable_root}", "--run_id=r1"] + services.pipeline_args())
    assert got["counts"] == first["counts"] and got["counts"]["failed"] == 1
    assert_same_outputs(direct_root / "runs" / "r1", portable_root / "runs" / "r1")

    # Second night: one image changed, one product added; the rest is reused.
    images = catalog.parent / "images"
    shape_image("disc", (10, 10, 10)).save(images / "p00-0.jpg", quality=92)
    shape_image(*FAMILIES[1]).save(images / "new-1.jpg", quality=92)
    with open(catalog, "a") as handle:
        handle.write("new-1,images/new-1.jpg,f1\n")
    second = run(common + [f"--output={direct_root}", "--run_id=r2"])
    got = run(common + [f"--output={portable_root}", "--run_id=r2"] + services.pipeline_args())
    assert got["counts"] == second["counts"]
    assert got["counts"]["reused"] == first["counts"]["embedded"] - 1
    assert got["counts"]["newly_embedded"] == 2
    assert_same_outputs(direct_root / "runs" / "r2", portable_root / "runs" / "r2")
    assert (portable_root / "LATEST").resolve() == (portable_root / "runs" / "r2").resolve()


def _sdist_venv(tmp: Path) -> Path:
    """A venv holding this package installed from the sdist ``--setup_file`` builds.

    The venv sees the global site-packages for the dependencies (a full
    install of TensorFlow & co. takes minutes), but the project itself comes
    only from the sdist: not from the checkout, not from an editable install.
    """
    import subprocess
    import sys
    import venv

    from tests.beam_services import REPO

    dist = tmp / "dist"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    shutil.rmtree(REPO / "visual_similarity_pipeline.egg-info", ignore_errors=True)
    [sdist] = dist.glob("*.tar.gz")
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-build-isolation", str(sdist)],
                   check=True, capture_output=True, timeout=300, cwd=tmp)
    return python


def test_worker_installed_only_from_the_setup_file_sdist(tmp_path):
    import os
    import subprocess

    python = _sdist_venv(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import pipeline, transforms; "
                            "print(pipeline.__file__); print(transforms.__file__)"],
                           cwd=outside, env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(tmp_path / "venv")) for line in where.stdout.split())

    catalog = write_catalog(tmp_path / "catalog", bad={"bad-1": b"\xff\xd8 truncated"})
    common = [f"--input={catalog}", "--model=raw_pixels_32", "--top_k=5", "--run_id=r1"]
    run(common + [f"--output={tmp_path / 'direct'}"])
    with BeamPortableServices(tmp_path / "services", python=str(python), worker_cwd=outside,
                              worker_env=env) as services:
        run(common + [f"--output={tmp_path / 'portable'}"] + services.pipeline_args())
    assert_same_outputs(tmp_path / "direct" / "runs" / "r1",
                        tmp_path / "portable" / "runs" / "r1")
