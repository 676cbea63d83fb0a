"""Launch the job on this machine with Beam's DirectRunner, using every core.

``python -m runners.direct --input=… --output=… [--workers=N] [pipeline options]``

DirectRunner's multi-processing mode runs bundles in separate worker
processes, each loading the model once, which is what a distributed runner
does and what scales with cores: one worker process per core is the default.
``--workers=1`` runs one in-memory process whose model uses every core instead;
it skips starting workers and shipping every stage's data to them, so a small
catalogue finishes sooner (1,000 images on 2 cores: 7.3 s against 9.2 s), while
on big ones worker processes stay slightly ahead (14,295 images: 183.5 against
186.7 images/s in the same run).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # before Beam's and TensorFlow's imports, which log
    from pipeline import logs as _early_logs

    _early_logs.quiet_startup()

from pipeline.run import main as run_main  # noqa: E402


def direct_args(argv: list[str]) -> list[str]:
    """Pipeline arguments for DirectRunner on all cores; user options win."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
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
