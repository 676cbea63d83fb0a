"""Dataflow offline: the launcher's checks and a dry run that builds the whole job.

``--dry_run=True`` makes Beam's DataflowRunner build and translate the job
(pipeline proto, Docker environment, the setup.py sdist staged locally) and
return without submitting it; the entry point then publishes nothing.
Needs the ``[gcp]`` extra (skips cleanly without it).
"""

from __future__ import annotations

import os

import pytest

from pipeline.run import main as run_main
from pipeline.run import run
from runners.dataflow import DataflowUsageError, dataflow_args
from runners.dataflow import main as dataflow_main
from tests.conftest import write_catalog

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                    reason="needs the [gcp] extra: pip install -e .[gcp]")

DATAFLOW = ["--project=test-project", "--region=europe-west1",
            "--temp_location=gs://vs-test/tmp"]


def test_dataflow_launcher_refuses_local_paths(capsys):
    with pytest.raises(DataflowUsageError, match="--input=/tmp/c.csv, --output=out"):
        dataflow_args(["--input=/tmp/c.csv", "--output=out"] + DATAFLOW)
    assert dataflow_main(["--input=gs://b/c.csv", "--output=/tmp/out"] + DATAFLOW) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read local paths: --output=/tmp/out" in err
    assert dataflow_main(["--input=gs://b/c.csv", "--output=gs://b/o", "--project=p",
                          "--region=r", "--temp_location=/tmp/t"]) == 2


def test_dataflow_dry_run_builds_the_job_and_publishes_nothing(tmp_path, capsys):
    catalog = write_catalog(tmp_path / "catalog")
    out = tmp_path / "out"
    summary = run([f"--input={catalog}", f"--output={out}", "--model=raw_pixels_32",
                   "--runner=DataflowRunner", "--dry_run=True",
                   f"--setup_file={os.path.abspath('setup.py')}"] + DATAFLOW)
    assert summary["dry_run"] and summary["runner"] == "DataflowRunner"
    assert summary["steps"] > 20
    [env] = summary["environments"]
    assert env["image"] and "beam_python3.11_sdk" in env["image"]
    assert any(name.endswith(".tar.gz") or "sdk" in name for name in env["staged"])
    assert summary["options"]["project"] == "test-project"
    assert not out.exists() or not any(out.rglob("*"))

    assert run_main([f"--input={catalog}", f"--output={out}", "--model=raw_pixels_32",
                     "--runner=DataflowRunner", "--dry_run=True"] + DATAFLOW) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Dry run on DataflowRunner") and "staged:" in printed
    assert not out.exists() or not any(out.rglob("*"))
