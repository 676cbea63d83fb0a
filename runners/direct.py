"""Launch the job on this machine with Beam's DirectRunner, one worker process per core.

``python -m runners.direct --input=… --output=… [--workers=N] [pipeline options]``

DirectRunner's multi-processing mode runs bundles in separate worker
processes, each loading the model once, which is what a distributed runner
does; it is the fastest way to run a whole catalogue on one machine.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.run import main as run_main


def direct_args(argv: list[str]) -> list[str]:
    """Pipeline arguments for DirectRunner multi-processing; user options win."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    known, rest = parser.parse_known_args(argv)
    defaults = ["--runner=DirectRunner", f"--direct_num_workers={max(1, known.workers)}",
                "--direct_running_mode=multi_processing"]
    given = {arg.split("=", 1)[0] for arg in rest if arg.startswith("--")}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + rest


def main(argv=None) -> int:
    """Console entry: run the pipeline locally on all cores."""
    return run_main(direct_args(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
