"""Launch the job on this machine with Beam's DirectRunner, using every core.

``python -m runners.direct --input=… --output=… [--workers=N] [pipeline options]``

DirectRunner's multi-processing mode runs bundles in separate worker
processes, each loading the model once, which is what a distributed runner
does and what scales with cores. On a machine of two cores or fewer, one
in-memory process whose model runs on every core is as fast on a big catalogue
and faster on a small one, because it skips starting workers and shipping every
stage's data to them (measured with ``bench/origin_b_compare.py`` and a 14,295-image
run: see README), so that is the default there; ``--workers=N`` overrides it.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.run import main as run_main


# Up to this many cores, one in-memory process beats one worker process per core.
IN_MEMORY_MAX_CORES = 2


def default_workers(cores: int) -> int:
    """Worker processes for a machine of ``cores`` cores (1 means in-memory, all cores)."""
    return 1 if cores <= IN_MEMORY_MAX_CORES else cores


def direct_args(argv: list[str]) -> list[str]:
    """Pipeline arguments for DirectRunner on all cores; user options win."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int, default=default_workers(os.cpu_count() or 1))
    known, rest = parser.parse_known_args(argv)
    workers = max(1, known.workers)
    mode = "in_memory" if workers == 1 else "multi_processing"
    defaults = ["--runner=DirectRunner", f"--direct_num_workers={workers}",
                f"--direct_running_mode={mode}"]
    given = {arg.split("=", 1)[0] for arg in rest if arg.startswith("--")}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + rest


def main(argv=None) -> int:
    """Console entry: run the pipeline locally on all cores."""
    return run_main(direct_args(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
