"""Embedding throughput: the pipeline against the raw model, as a ratio measured in one run.

    python bench/embed_throughput.py [--products ../shared/data/products] [--model efficientnet_lite0]
                                     [--min_seconds 60] [--workers N]

(a) the model's own ceiling on this machine: pre-decoded tensors, best batch size, best
    split of the cores (one process with all threads, or one single-threaded process per
    core running at once), for the TFLite engine and the TensorFlow SavedModel;
(b) the pipeline end to end, JPEG files → written Parquet features, on DirectRunner in both
    local set-ups that use every core: one in-memory process with one model lane per core
    (``pipeline.run``'s default) and one worker process per core (``runners.direct``), on the
    real product photos repeated until a run lasts at least ``--min_seconds``
    (``--pipeline_workers`` picks the set-ups: worker counts, 1 = in memory);
and prints (b) / (a) for each. Target: ≥ 0.8. Ratios hold on a noisy shared machine; absolute
numbers don't, so compare only figures from the same run.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_PRODUCTS = REPO.parent / "shared" / "data" / "products"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_steal import StealMeter  # noqa: E402


def _engine(model, engine: str, threads: int, lanes: int = 1):
    from pipeline.models.handler import ModelHandler, resolve
    from pipeline.models.sources import model_source

    resolved = resolve(model_source(model), engine)
    return resolved, ModelHandler(resolved, threads, lanes).load_model()


def measure_raw(model: str, engine: str, threads: int, batch: int, seconds: float,
                start_at: float | None = None, queue=None, lanes: int = 1) -> float:
    """Images per second of one engine instance on random pre-decoded images: the
    model's own speed, with no decoding, I/O or pipeline around it. With ``lanes``,
    that many threads call it at once (one interpreter each, sharing ``threads``),
    as the pipeline's embed step does."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipeline.models.engines import configure_tf_threads

    configure_tf_threads(threads)
    resolved, run = _engine(model, engine, threads, lanes)
    images = np.random.default_rng(0).random(
        (batch, resolved.input_size, resolved.input_size, 3)).astype(np.float32)
    callers = run.lanes
    with ThreadPoolExecutor(callers) as pool:  # warm-up: plan each interpreter
        list(pool.map(lambda _: run(images), range(callers)))
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()

    def calls(_) -> int:
        done = 0
        while time.perf_counter() - started < seconds:
            run(images)
            done += batch
        return done

    with ThreadPoolExecutor(callers) as pool:
        done = sum(pool.map(calls, range(callers)))
    rate = done / (time.perf_counter() - started)
    if queue is not None:
        queue.put(rate)
    return rate


def _parallel(model: str, engine: str, processes: int, batch: int, seconds: float) -> float:
    """Total images per second of ``processes`` single-threaded engines running at once."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 25.0  # time for every process to load and warm up
    procs = [ctx.Process(target=measure_raw,
                         args=(model, engine, 1, batch, seconds, start_at, queue))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


# The sweep behind pipeline.models.engines.PREFERRED_BATCH (the pipeline's default
# --batch_size per engine).
BATCHES = (1, 2, 8, 32)


def raw_ceiling(model: str, engine: str, cores: int, seconds: float) -> dict:
    """Best raw throughput over batch sizes and core splits; returns every measurement."""
    from pipeline.models.engines import lanes_for

    results = {}
    for batch in BATCHES:
        results[f"1 process x {cores} threads, batch {batch}"] = measure_raw(
            model, engine, cores, batch, seconds)
    lanes = lanes_for(engine, cores)
    if lanes > 1:  # the in-memory pipeline's set-up: single-threaded interpreters at once
        for batch in BATCHES:
            results[f"1 process, {lanes} lanes x 1 thread, batch {batch}"] = measure_raw(
                model, engine, cores, batch, seconds, lanes=lanes)
    if cores > 1:
        for batch in BATCHES:
            results[f"{cores} processes x 1 thread, batch {batch}"] = _parallel(
                model, engine, cores, batch, seconds)
    return results


def repeated_manifest(products: Path, directory: str, repeats: int) -> tuple[str, int]:
    """A manifest listing every product ``repeats`` times under distinct ids."""
    with open(products / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    path = os.path.join(directory, "repeated.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "image"])
        for r in range(repeats):
            for row in rows:
                writer.writerow([f"{row['product_id']}-{r}", str(products / row["image"])])
    return path, len(rows) * repeats


def pipeline_rate(manifest: str, out: str, model: str, engine: str, workers: int) -> dict:
    """End-to-end images/s of the pipeline (JPEG → Parquet), with and without start-up."""
    from pipeline.run import run
    from runners.direct import direct_args

    started = time.perf_counter()
    result = run(direct_args([f"--input={manifest}", f"--output={out}", f"--model={model}",
                              f"--engine={engine}", "--features_only", f"--workers={workers}"]))
    wall = time.perf_counter() - started
    return {"images": result["counts"]["embedded"], "wall_s": wall,
            "rate": result["counts"]["embedded"] / wall, "engine": result["engine"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=Path, default=DEFAULT_PRODUCTS)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pipeline_workers", default="",
                        help="comma-separated worker counts for (b), 1 = one in-memory process; "
                        "default: 1 and one per core (pipeline.run's and runners.direct's set-ups)")
    parser.add_argument("--min_seconds", type=float, default=60.0)
    parser.add_argument("--raw_seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    if not (args.products / "catalog.csv").exists():
        print(f"no catalogue at {args.products}; pass --products", file=sys.stderr)
        return 2
    cores = args.workers
    print(f"model {args.model}, {cores} cores\n")

    print("(a) raw model on pre-decoded tensors (images/s)")
    ceilings = {}
    for engine in ("tflite", "savedmodel"):
        with StealMeter() as meter:
            results = raw_ceiling(args.model, engine, cores, args.raw_seconds)
        for config, rate in results.items():
            print(f"  {engine:10s} {config:36s} {rate:7.1f}")
        ceilings[engine] = max(results.values())
        print(f"  ({engine}: {meter.seconds:.0f} s{meter.label()})")
    print(f"  ceiling: tflite {ceilings['tflite']:.1f}, savedmodel {ceilings['savedmodel']:.1f} "
          f"-> TFLite is {ceilings['tflite'] / ceilings['savedmodel']:.2f}x TensorFlow\n")

    best_engine = max(ceilings, key=ceilings.get)
    ceiling = ceilings[best_engine]
    repeats = max(1, math.ceil(args.min_seconds * ceiling
                               / sum(1 for _ in open(args.products / "catalog.csv")) - 1e-9))
    counts = ([int(w) for w in args.pipeline_workers.split(",")] if args.pipeline_workers
              else sorted({1, cores}))
    from pipeline.models.engines import lanes_for

    lanes = lanes_for(best_engine, cores)
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        manifest, n = repeated_manifest(args.products, tmp, repeats)
        tiny = os.path.join(tmp, "tiny.csv")
        with open(manifest) as src, open(tiny, "w") as dst:
            dst.writelines(line for i, line in enumerate(src) if i <= 2 * cores)
        print(f"(b) pipeline, JPEG files -> Parquet, DirectRunner, {n} images "
              f"({repeats} x catalogue), engine {best_engine}")
        rates = {}
        for workers in counts:
            mode = (f"1 in-memory process, {lanes} model lane(s)" if workers == 1
                    else f"{workers} worker processes")
            startup = pipeline_rate(tiny, os.path.join(tmp, f"tiny-{workers}"), args.model,
                                    "auto", workers)
            with StealMeter() as meter:
                result = pipeline_rate(manifest, os.path.join(tmp, f"out-{workers}"), args.model,
                                       "auto", workers)
            steady = result["images"] / (result["wall_s"] - startup["wall_s"])
            rates[mode] = result["rate"]
            print(f"  {mode}: {result['images']} images in {result['wall_s']:.1f} s = "
                  f"{result['rate']:.1f} images/s (engine {result['engine']}, start-up "
                  f"included{meter.label()}); fixed start-up (a run of {startup['images']} "
                  f"images) {startup['wall_s']:.1f} s, steady state {steady:.1f} images/s "
                  f"= {steady / ceiling:.2f}", flush=True)
    print()
    for mode, rate in rates.items():
        print(f"ratio (b)/(a), {mode}: {rate:.1f} / {ceiling:.1f} = {rate / ceiling:.2f} "
              f"end to end (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
