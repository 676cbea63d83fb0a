"""Launchers: the arguments they hand to the pipeline."""

from __future__ import annotations

import os

import pytest

from runners.dataflow import SETUP_FILE, DataflowUsageError, dataflow_args
from runners.dataflow import main as dataflow_main
from runners.direct import direct_args


def test_direct_launcher_uses_worker_processes_and_lets_user_options_win():
    args = direct_args(["--input=x", "--output=y", "--workers=3"])
    assert "--direct_num_workers=3" in args
    assert "--direct_running_mode=multi_processing" in args
    assert args[-2:] == ["--input=x", "--output=y"]
    one = direct_args(["--input=x", "--workers=1"])
    assert "--direct_running_mode=in_memory" in one and "--direct_num_workers=1" in one

    mine = direct_args(["--direct_running_mode=in_memory", "--input=x"])
    assert "--direct_running_mode=multi_processing" not in mine


def test_dataflow_launcher_ships_the_project_and_requires_its_settings(capsys):
    args = dataflow_args(["--input=gs://b/c.csv", "--output=gs://b/o", "--project=p",
                          "--region=europe-west1", "--temp_location=gs://b/tmp"])
    assert args[0] == "--runner=DataflowRunner"
    assert f"--setup_file={SETUP_FILE}" in args and os.path.exists(SETUP_FILE)
    custom = dataflow_args(["--project=p", "--region=r", "--temp_location=gs://t",
                            "--sdk_container_image=eu.gcr.io/p/similarity:1"])
    assert not any(a.startswith("--setup_file") for a in custom)
    with pytest.raises(DataflowUsageError, match="--region, --temp_location"):
        dataflow_args(["--project=p"])
    assert dataflow_main(["--project=p"]) == 2
    assert capsys.readouterr().err.startswith("error: Dataflow needs --region")

