"""The job on Beam's portable runner gives DirectRunner's outputs, byte for byte.

A local job service and an EXTERNAL worker pool run on 127.0.0.1 in their own
processes (tests/beam_services.py); workers unpickle and run every DoFn
themselves, as on a distributed runner. A full run and an incremental second
run are compared with the same runs on DirectRunner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import logs, progress
from pipeline.run import run
from tests.beam_services import REPO, BeamPortableServices, repo_env
from tests.conftest import FAMILIES, shape_image, write_catalog
from tests.test_run_experience import last_progress

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


def setup_file_sdist(dist: Path) -> Path:
    """The sdist Beam's stager builds from ``--setup_file`` (``python setup.py sdist``,
    as Beam runs it when the ``build`` module is not installed)."""
    dist.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    shutil.rmtree(REPO / "visual_similarity_pipeline.egg-info", ignore_errors=True)
    [sdist] = dist.glob("*.tar.gz")
    return sdist


def _sdist_venv(tmp: Path) -> Path:
    """A venv holding this package installed from the sdist ``--setup_file`` builds.

    The venv sees the global site-packages for the dependencies (a full
    install of TensorFlow & co. takes minutes; the opt-in fresh-venv test below
    does it), but the project itself comes only from the sdist: not from the
    checkout, not from an editable install.
    """
    import venv

    sdist = setup_file_sdist(tmp / "dist")
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-build-isolation", str(sdist)],
                   check=True, capture_output=True, timeout=300, cwd=tmp)
    return python


def test_worker_installed_only_from_the_setup_file_sdist(tmp_path):
    python = _sdist_venv(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", ("import pipeline, transforms; "
                            "print(pipeline.__file__); print(transforms.__file__)")],
                           cwd=outside, env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(tmp_path / "venv")) for line in where.stdout.split())

    catalog = write_catalog(tmp_path / "catalog", bad={"bad-1": b"\xff\xd8 truncated"})
    common = [f"--input={catalog}", "--model=raw_pixels_32", "--top_k=5", "--run_id=r1"]
    run(common + [f"--output={tmp_path / 'direct'}"])
    with BeamPortableServices(tmp_path / "services", python=str(python), worker_cwd=outside,
                              worker_env=env) as services:
        # The pool starts workers as the ``python`` on its PATH: it must be the venv's.
        assert shutil.which("python", path=services.worker_env["PATH"]) == str(python)
        run(common + [f"--output={tmp_path / 'portable'}"] + services.pipeline_args())
    assert_same_outputs(tmp_path / "direct" / "runs" / "r1",
                        tmp_path / "portable" / "runs" / "r1")


def _quiet_env() -> dict:
    """The launcher's environment with nothing that would quiet it for it."""
    env = repo_env()
    for name in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", logs.ENV_LEVEL, progress.ENV_DIR):
        env.pop(name, None)
    return env


def test_default_model_portable_run_is_quiet_shows_progress_and_matches_direct_runner(
        tmp_path, services):
    # The default model runs through TFLite (the other tests here use raw_pixels_32 on
    # TensorFlow): the workers load the converted model from the shared cache.
    catalog = write_catalog(tmp_path / "catalog", families=FAMILIES[:3], copies=2,
                            bad={"bad-1": b"not an image"})
    common = [f"--input={catalog}", "--top_k=3", "--run_id=r1"]
    direct = run(common + [f"--output={tmp_path / 'direct'}"])
    assert direct["model"].startswith("efficientnet_lite0@") and direct["engine"] == "tflite"

    root = tmp_path / "portable"
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", *common, f"--output={root}",
                           "--progress_interval=0.2", *services.pipeline_args()],
                          check=False, cwd=REPO, env=_quiet_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr + services.worker_log()[-3000:]
    # Only progress lines: no Beam, TensorFlow, absl or gRPC records from the launcher,
    # nor relayed from the job service and its EXTERNAL workers.
    assert [line for line in proc.stderr.splitlines() if not line.startswith("progress: ")] == []
    manifest = json.loads((root / "runs" / "r1" / "manifest.json").read_text())
    assert manifest["engine"] == "tflite" and manifest["counts"] == direct["counts"]
    # The workers (other processes, started by the pool) wrote the status files.
    last = last_progress(proc.stderr)
    counts = manifest["counts"]
    assert (int(last["read"]), int(last["embedded"]), int(last["failed"])) == (
        counts["input"], counts["newly_embedded"], counts["failed"]) == (7, 6, 1)
    assert last["by_stage"] == "decode 1" and last["phase"] == "publishing"
    # Workers log at WARNING (--default_sdk_harness_log_level): their INFO records,
    # e.g. BatchElements statistics, are dropped before they reach the job service.
    job_log = (services.log_dir / "job_service.log").read_text(errors="replace")
    assert "BatchElements statistics" not in job_log
    assert "Discarding unparseable args" not in job_log
    assert_same_outputs(tmp_path / "direct" / "runs" / "r1", root / "runs" / "r1")


def test_remote_workers_get_one_line_then_the_final_counts_from_job_metrics(
        tmp_path, services, monkeypatch, capsys):
    # Workers that cannot write to this machine (Dataflow, Docker, other hosts): the job
    # runs on the same local services, with the launcher treating them as remote.
    import pipeline.run as run_module

    monkeypatch.setattr(run_module, "workers_share_this_machine", lambda options: False)
    catalog = write_catalog(tmp_path / "catalog", families=FAMILIES[:2], copies=2,
                            bad={"bad-1": b"not an image"})
    manifest = run([f"--input={catalog}", f"--output={tmp_path / 'out'}", "--run_id=r1",
                    "--model=raw_pixels_32", "--engine=savedmodel", "--top_k=3",
                    "--progress_interval=0.2"] + services.pipeline_args())
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("progress: ")]
    assert lines[0] == ("progress: live counts are not available: PortableRunner workers "
                        "cannot write to this machine; the counts follow when the job ends")
    assert len(lines) == 2
    last, counts = last_progress("\n".join(lines)), manifest["counts"]
    assert (int(last["read"]), int(last["embedded"]), int(last["failed"])) == (
        counts["input"], counts["newly_embedded"], counts["failed"]) == (5, 4, 1)
    assert last["by_stage"] == "decode 1"
    assert list(manifest["launcher_phases"])[:3] == ["start-up", "job", "publishing"]


SLOW_TESTS = os.environ.get("SIMILARITY_SLOW_TESTS") == "1"


def _fresh_venv(tmp: Path, sdist: Path) -> Path:
    """A venv without system site-packages holding the sdist and its declared requirements.

    Everything comes from the package index (the pip cache helps a second
    time), as on a Dataflow worker given ``--setup_file``: nothing from this
    interpreter's site-packages, the user site or the checkout.
    """
    import venv

    env_dir = tmp / "fresh-venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(sdist)],
                             check=False, cwd=tmp, env=_isolated_env(), capture_output=True, text=True,
                             timeout=3600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], check=False, cwd=tmp, env=_isolated_env(),
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    return python


def _isolated_env(extra: dict | None = None) -> dict:
    """This environment without anything that would import code from outside a venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra or {})
    return env


@pytest.mark.skipif(not SLOW_TESTS, reason="installs TensorFlow, Beam & co. from the package "
                    "index into a fresh venv (minutes); set SIMILARITY_SLOW_TESTS=1 to run it")
def test_fresh_venv_worker_with_only_the_sdist_and_its_requirements(tmp_path):
    sdist = setup_file_sdist(tmp_path / "dist")
    python = _fresh_venv(tmp_path, sdist)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # The worker converts the default model itself, from the weights its own install
    # brought, into an empty cache of its own: nothing is shared with the launcher.
    worker_env = _isolated_env({"SIMILARITY_CACHE_DIR": str(tmp_path / "worker-models"),
                                "HOME": str(outside)})
    where = subprocess.run(
        [str(python), "-c", ("import sys, apache_beam, tensorflow, ai_edge_litert, pipeline, "
         "transforms; print(*[m.__file__ for m in (apache_beam, tensorflow, ai_edge_litert, "
         "pipeline, transforms)], sep='\\n'); print(*sys.path, sep='\\n')")],
        cwd=outside, env=worker_env, capture_output=True, text=True, check=True)
    venv_dir = str(tmp_path / "fresh-venv")
    modules, paths = where.stdout.split("\n")[:5], where.stdout.split("\n")[5:]
    assert all(m.startswith(venv_dir) for m in modules), modules
    site_dirs = [p for p in paths if "site-packages" in p or "dist-packages" in p]
    assert site_dirs and all(p.startswith(venv_dir) for p in site_dirs), site_dirs

    catalog = write_catalog(tmp_path / "catalog", bad={"bad-1": b"\xff\xd8 truncated"})
    common = [f"--input={catalog}", "--top_k=5", "--run_id=r1"]
    direct = run(common + [f"--output={tmp_path / 'direct'}"])
    assert direct["engine"] == "tflite"
    with BeamPortableServices(tmp_path / "services", python=str(python), worker_cwd=outside,
                              worker_env=worker_env) as services:
        got = run(common + [f"--output={tmp_path / 'portable'}"] + services.pipeline_args())
        worker_log = services.worker_log()
    assert got["counts"] == direct["counts"], worker_log[-3000:]
    assert list((tmp_path / "worker-models").iterdir()), "the worker did not convert the model"
    assert_same_outputs(tmp_path / "direct" / "runs" / "r1",
                        tmp_path / "portable" / "runs" / "r1")
