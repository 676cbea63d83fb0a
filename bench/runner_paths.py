"""Wall time of every runner path on one small catalogue, in one session.

    python bench/runner_paths.py [--products ../shared/data/products] [--rows 200]

Runs ``python -m pipeline.run`` (as a user would, one process per run) on the
same catalogue along each path the project supports or checks offline:

- DirectRunner in memory, and with 2 worker processes;
- PortableRunner with a local job service and an EXTERNAL worker pool on
  127.0.0.1 (tests/beam_services.py), with raw_pixels_32 on TensorFlow (what
  the test suite's portable runs use) and with the default model (TFLite);
- the same portable services with the catalogue, its images and the output
  root in gs:// on a local ``gcp-storage-emulator``;
- ``python -m runners.dataflow … --dry_run=True`` on the gs:// paths (the job
  is built and translated, nothing submitted or written).

The model cache is warmed by an untimed first run. Each line gives the wall
time, its ratio to the in-memory run and the CPU steal during it, and whether
the run's neighbours are byte-identical to the in-memory run's. Without the
shared products it uses the built-in sample (python -m pipeline.sample).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu_steal import StealMeter  # noqa: E402
from tests.beam_services import BeamPortableServices, GcsEmulator, TokenServer, repo_env  # noqa: E402

DEFAULT_PRODUCTS = REPO.parent / "shared" / "data" / "products"
BUCKET = "vs-bench"


def make_catalogue(products: Path, rows: int, work: Path) -> Path:
    """A catalog.csv with relative image paths and its images, under ``work/catalog``."""
    target = work / "catalog"
    (target / "images").mkdir(parents=True)
    if not (products / "catalog.csv").exists():
        subprocess.run([sys.executable, "-m", "pipeline.sample", str(work / "sample")],
                       cwd=REPO, check=True, capture_output=True)
        products = work / "sample"
    with open(products / "catalog.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = ["product_id", "image"]
        chosen = [row for _, row in zip(range(rows), reader)]
    with open(target / "catalog.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in chosen:
            name = f"images/{Path(row['image']).name}"
            shutil.copyfile(products / row["image"], target / name)
            writer.writerow({"product_id": row["product_id"], "image": name})
    return target / "catalog.csv"


def _env(extra: dict | None = None) -> dict:
    env = repo_env(extra)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", "SIMILARITY_LOG_LEVEL",
                 "SIMILARITY_PROGRESS_DIR"):
        env.pop(name, None)
    return env


def timed(module: str, args: list[str], env: dict) -> tuple[StealMeter, subprocess.CompletedProcess]:
    """Run ``python -m module args`` and measure its wall time and CPU steal."""
    with StealMeter() as meter:
        proc = subprocess.run([sys.executable, "-m", module, *args, "--no_progress"],
                              check=False,
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return meter, proc


def embedded(proc: subprocess.CompletedProcess) -> str:
    """The run summary's ``embedded`` count (``-`` for a dry run, which has none)."""
    lines = proc.stdout.splitlines()
    for header, values in zip(lines, lines[1:]):
        if header.split()[:2] == ["input", "embedded"]:
            return values.split()[1]
    return "-"


def _neighbours(read) -> bytes:
    return b"".join(read(name) for name in sorted(read.names))


class LocalRun:
    """Reads a local run's neighbour shards."""

    def __init__(self, root: Path):
        self.dir = root / "LATEST"
        self.names = [p.name for p in (self.dir / "neighbors").glob("*")]

    def __call__(self, name: str) -> bytes:
        return (self.dir / "neighbors" / name).read_bytes()


class GcsRun:
    """Reads a gs:// run's neighbour shards through the emulator."""

    def __init__(self, emulator: GcsEmulator, prefix: str):
        run = emulator.read(f"gs://{BUCKET}/{prefix}/LATEST").decode().strip()
        self.base = f"{prefix}/{run}/neighbors/"
        self.emulator = emulator
        self.names = [n[len(self.base):] for n in emulator.names(BUCKET, self.base)]

    def __call__(self, name: str) -> bytes:
        return self.emulator.read(f"gs://{BUCKET}/{self.base}{name}")


def main(argv=None) -> int:
    """Measure each path and print one line per path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=Path, default=DEFAULT_PRODUCTS)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="runner-paths-"))
    try:
        catalog = make_catalogue(args.products, args.rows, work)
        env = _env()
        print(f"catalogue: {args.rows} rows ({catalog}), {os.cpu_count()} CPUs")
        warm, _ = timed("pipeline.run", [f"--input={catalog}", f"--output={work / 'warm'}"],
                        env)
        print(f"warm-up run (model cache): {warm.seconds:.1f} s{warm.label()}")
        results = []

        def record(name, measured, read):
            meter, proc = measured
            results.append((name, meter, _neighbours(read) if read else None))
            base = results[0][1].seconds
            same = ("" if read is None else
                    "  neighbours = in-memory" if results[-1][2] == results[0][2]
                    else "  NEIGHBOURS DIFFER")
            print(f"{name:<46} {meter.seconds:7.1f} s  x{meter.seconds / base:5.2f}  "
                  f"embedded {embedded(proc):>5}{meter.label()}{same}", flush=True)

        local = [f"--input={catalog}"]
        out = work / "direct"
        record("DirectRunner in memory", timed("pipeline.run", local + [f"--output={out}"],
                                               env), LocalRun(out))
        out = work / "multi"
        record("DirectRunner, 2 worker processes",
               timed("pipeline.run", local + [f"--output={out}", "--direct_num_workers=2",
                                              "--direct_running_mode=multi_processing"],
                     env), LocalRun(out))

        with GcsEmulator(work / "emu", buckets=(BUCKET,)) as emulator, TokenServer() as tokens:
            gcs = {"STORAGE_EMULATOR_HOST": emulator.host,
                   "GOOGLE_APPLICATION_CREDENTIALS":
                       str(tokens.write_credentials(work / "adc.json"))}
            emulator.upload_tree(catalog.parent, BUCKET, "cat")
            started = time.perf_counter()
            with BeamPortableServices(work / "beam", worker_env=_env(gcs),
                                      job_env=_env(gcs)) as services:
                print(f"job service + worker pool start: "
                      f"{time.perf_counter() - started:.1f} s (not in the figures below)")
                portable = services.pipeline_args()
                out = work / "portable-raw"
                record("PortableRunner (files), raw_pixels_32",
                       timed("pipeline.run", local + [f"--output={out}", "--model=raw_pixels_32",
                                                      "--engine=savedmodel"] + portable,
                             env), None)
                out = work / "portable"
                record("PortableRunner (files), default model",
                       timed("pipeline.run", local + [f"--output={out}"] + portable, env),
                       LocalRun(out))
                gs = [f"--input=gs://{BUCKET}/cat/catalog.csv", f"--output=gs://{BUCKET}/out"]
                record("PortableRunner, gs:// emulator, default model",
                       timed("pipeline.run", gs + portable, _env(gcs)),
                       GcsRun(emulator, "out"))
            record("Dataflow dry run (gs://, job built, not sent)",
                   timed("runners.dataflow", [f"--input=gs://{BUCKET}/cat/catalog.csv",
                                              f"--output=gs://{BUCKET}/dry",
                                              "--project=bench-project",
                                              "--region=europe-west1",
                                              f"--temp_location=gs://{BUCKET}/tmp",
                                              "--dry_run=True"], _env(gcs)), None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
