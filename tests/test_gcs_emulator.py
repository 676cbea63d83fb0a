"""gs:// end to end against a local GCS emulator, on the portable runner.

The catalogue and its images live in gs://, the output root is gs://, and the
job runs on Beam's portable runner with EXTERNAL workers in their own
processes: LATEST is the one-line object, a second run reuses the first's
embeddings, and an exporter reads the gs:// run. Also: an unreachable gs://
and a refused credential fail within seconds in one line. Needs the [gcp]
extra and ``gcp-storage-emulator`` (skips cleanly without them).
"""

from __future__ import annotations

import sqlite3
import time

import pytest

pytest.importorskip("apache_beam.io.gcp.gcsfilesystem", reason="needs the [gcp] extra")
pytest.importorskip("gcp_storage_emulator", reason="needs pip install gcp-storage-emulator")

from pipeline.export import main as export_main  # noqa: E402
from pipeline.run import main as run_main  # noqa: E402
from pipeline.run import run
from tests.beam_services import BeamPortableServices, GcsEmulator, TokenServer, free_port, repo_env  # noqa: E402
from tests.conftest import write_catalog  # noqa: E402

BUCKET = "vs-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Emulator + token server + portable services sharing one environment."""
    base = tmp_path_factory.mktemp("gcs")
    mp = pytest.MonkeyPatch()
    with GcsEmulator(base / "emu", buckets=(BUCKET,)) as emulator, TokenServer() as tokens:
        creds = tokens.write_credentials(base / "adc.json")
        env = {"STORAGE_EMULATOR_HOST": emulator.host,
               "GOOGLE_APPLICATION_CREDENTIALS": str(creds)}
        for key, value in env.items():
            mp.setenv(key, value)
        with BeamPortableServices(base / "beam", worker_env=repo_env(env),
                                  job_env=repo_env(env)) as services:
            yield emulator, services, tokens
    mp.undo()


def test_gs_catalogue_and_output_on_the_portable_runner(tmp_path, gcs):
    emulator, services, _ = gcs
    write_catalog(tmp_path / "catalog", bad={"bad-1": b"not an image"})
    emulator.upload_tree(tmp_path / "catalog", BUCKET, "cat")
    common = [f"--input=gs://{BUCKET}/cat/catalog.csv", f"--output=gs://{BUCKET}/out",
              "--model=raw_pixels_32", "--top_k=5"] + services.pipeline_args()

    first = run(common + ["--run_id=r1"])
    assert first["counts"]["embedded"] == 18 and first["counts"]["failed"] == 1
    assert emulator.read(f"gs://{BUCKET}/out/LATEST") == b"runs/r1\n"
    names = emulator.names(BUCKET, "out/runs/r1/")
    assert "out/runs/r1/manifest.json" in names and "out/runs/r1/INCOMPLETE" not in names
    assert any(n.startswith("out/runs/r1/neighbors/") for n in names)

    second = run(common + ["--run_id=r2"])
    assert second["counts"]["reused"] == 18 and second["counts"]["newly_embedded"] == 0
    assert emulator.read(f"gs://{BUCKET}/out/LATEST") == b"runs/r2\n"
    assert (emulator.read(f"gs://{BUCKET}/out/runs/r2/neighbors/neighbors-00000-of-00001.jsonl")
            == emulator.read(f"gs://{BUCKET}/out/runs/r1/neighbors/neighbors-00000-of-00001.jsonl"))

    db = tmp_path / "similar.db"
    assert export_main([f"--run=gs://{BUCKET}/out/LATEST", "sqlite", str(db)]) == 0
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        count = conn.execute(f"select count(distinct product_id) from "
                             f"{[t for t in tables if 'neighbor' in t][0]}").fetchone()[0]
    assert count == 18


def test_unreachable_gcs_fails_fast_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert run_main(["--input=gs://vs-test/cat/catalog.csv", f"--output={tmp_path}/o",
                     "--model=raw_pixels_32"]) == 2
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: gs://vs-test/cat/catalog.csv: "
                                                   "cannot reach http://127.0.0.1:")


def test_refused_credential_fails_fast_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with TokenServer(refuse=True) as tokens:
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                           str(tokens.write_credentials(tmp_path / "adc.json")))
        started = time.monotonic()
        assert run_main([f"--input={tmp_path}/c.csv", "--output=gs://vs-test/out",
                         "--model=raw_pixels_32"]) == 2
        assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: gs://vs-test/out: the Google credential cannot get an "
                          "access token") and "invalid_grant" in err


def test_dataflow_launcher_dry_run_on_gs_paths_writes_nothing(tmp_path, gcs, capsys):
    pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient")
    from runners.dataflow import main as dataflow_main

    emulator, _, _ = gcs
    write_catalog(tmp_path / "catalog")
    emulator.upload_tree(tmp_path / "catalog", BUCKET, "dry/cat")
    assert dataflow_main([f"--input=gs://{BUCKET}/dry/cat/catalog.csv",
                          f"--output=gs://{BUCKET}/dry/out", "--model=raw_pixels_32",
                          "--project=test-project", "--region=europe-west1",
                          f"--temp_location=gs://{BUCKET}/dry/tmp", "--dry_run=True"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Dry run on DataflowRunner") and "workflow.tar.gz" in printed
    assert not [n for n in emulator.names(BUCKET, "dry/") if not n.startswith("dry/cat/")]
