"""The gs:// pre-flight's answers that need no server: a missing [gcp] extra, no gs:// at all."""

from __future__ import annotations

import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import object_store
from pipeline.run import main as run_main


def test_missing_gcp_extra_is_its_own_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "apache_beam.io.gcp.gcsfilesystem", None)
    with pytest.raises(object_store.ObjectStoreError, match=r"need the \[gcp\] extra"):
        object_store.check_gcs(["gs://b/catalog.csv"])
    assert run_main(["--input=gs://b/catalog.csv", f"--output={tmp_path}/o",
                     "--model=raw_pixels_32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: gs://b/catalog.csv: gs:// paths need the [gcp] extra")
    assert "pip install -e '.[gcp]'" in err


def test_only_gs_paths_are_checked_and_a_dry_run_skips_temp_location():
    options = PipelineOptions(["--input=/x/c.csv", "--output=gs://b/out",
                               "--temp_location=gs://b/tmp"])
    assert object_store.gcs_paths(options) == ["gs://b/out", "gs://b/tmp"]
    dry = PipelineOptions(["--input=gs://b/c.csv", "--output=/o", "--temp_location=gs://b/t",
                           "--dry_run=True"])
    assert object_store.gcs_paths(dry) == ["gs://b/c.csv"]
    object_store.check_gcs([])  # nothing to check: no import, no network
