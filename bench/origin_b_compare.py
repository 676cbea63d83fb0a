"""Origin B's script against this pipeline: same model, same images, end to end.

    python bench/origin_b_compare.py [--products ../shared/data/products] [--n 1000]
                                     [--model efficientnet_lite0] [--workers 2] [--rounds 3]

Origin B (../shared/docs/origins.md) embeds one image per model call through TF-Hub
(decode, ``resize_with_pad`` to 224, scale to [0, 1]), saves one text file per vector,
loads them back into an Annoy index with 10,000 trees, and writes the top-20 of every
product as one JSON list. This script re-creates that flow faithfully (it is a baseline,
not product code) and times it, then times ``pipeline.run`` on the same images with the
same model on DirectRunner, in both local modes: one in-memory process whose model uses
every core (``pipeline.run``'s default) and one worker process per core
(``runners.direct``), and prints the speed-ups next to the ceiling: origin B's time over
the time the model alone needs for these images on this machine (pre-decoded tensors, no
I/O, no start-up), the most any pipeline could reach here. All timings are taken in this
one run, interleaved over ``--rounds`` rounds (the median speed-up is reported), and each
is printed with the CPU time the hypervisor stole meanwhile, so a contended round can be
recognised.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_PRODUCTS = REPO.parent / "shared" / "data" / "products"
RAW_SECONDS = 8.0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_steal import StealMeter  # noqa: E402
from embed_throughput import measure_raw  # noqa: E402


def origin_b(images: list[str], model_dir: str, work: str, trees: int = 10_000,
             k: int = 20) -> dict:
    """Origin B's flow; returns its stage timings."""
    import tensorflow as tf
    import tensorflow_hub as hub
    from annoy import AnnoyIndex

    started = time.perf_counter()
    module = hub.load(model_dir)
    vectors_dir = os.path.join(work, "vectors")
    os.makedirs(vectors_dir)
    for path in images:  # one image per model call, one text file per vector
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize_with_pad(image, 224, 224) / 255.0
        features = np.squeeze(module(image[tf.newaxis, ...]).numpy())
        # (origin B names these text files .npz, although np.savetxt writes text)
        np.savetxt(os.path.join(vectors_dir, Path(path).stem + ".npz"), features, delimiter=",")
    embedded = time.perf_counter()

    files = sorted(glob.glob(os.path.join(vectors_dir, "*.npz")))
    names = [Path(f).stem for f in files]
    index = None
    vectors = []
    for i, path in enumerate(files):
        vector = np.loadtxt(path)
        vectors.append(vector)
        if index is None:
            index = AnnoyIndex(len(vector), "angular")
        index.add_item(i, vector)
    index.build(trees)
    pairs = []
    for i, master in enumerate(vectors):
        for j in index.get_nns_by_vector(master, k + 1):
            if j == i:
                continue
            neighbor = vectors[j]
            cosine = float(np.dot(master, neighbor) / np.linalg.norm(master)
                           / np.linalg.norm(neighbor))
            pairs.append({"similarity": round(cosine, 4), "master_pi": names[i],
                          "similar_pi": names[j]})
    with open(os.path.join(work, "nearest_neighbors.json"), "w") as handle:
        json.dump(pairs, handle)
    finished = time.perf_counter()
    return {"embed_s": embedded - started, "index_s": finished - embedded,
            "total_s": finished - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=Path, default=DEFAULT_PRODUCTS)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (origin B, then each pipeline mode); the "
                        "median speed-up is reported")
    args = parser.parse_args(argv)
    if not (args.products / "catalog.csv").exists():
        print(f"no catalogue at {args.products}; pass --products", file=sys.stderr)
        return 2
    from pipeline.models.engines import lanes_for, preferred_batch
    from pipeline.models.registry import resolve_model, savedmodel_path
    from pipeline.run import run

    with open(args.products / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[: args.n]
    images = [str(args.products / r["image"]) for r in rows]
    n = len(images)
    modes = {
        "in-memory, 1 process": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
        f"multi-processing, {args.workers} workers": [
            "--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"],
    }
    speedups = {name: [] for name in modes}
    # Speed-up over the ceiling of the same round: how close the pipeline gets to the
    # model alone, which does not move with how fast origin B happens to run.
    shares = {name: [] for name in modes}
    ceilings = []
    cores = os.cpu_count() or 1
    engine = resolve_model(args.model).engine
    batch = preferred_batch(engine)
    lanes = lanes_for(engine, cores)
    print(f"{n} images, model {args.model}, {args.rounds} round(s)")
    for round_no in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="origin-b-") as tmp:
            manifest = os.path.join(tmp, "catalog.csv")
            with open(manifest, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["product_id", "image"])
                writer.writerows([r["product_id"], path] for r, path in zip(rows, images))
            with StealMeter() as meter:
                baseline = origin_b(images, savedmodel_path(args.model), tmp)
            print(f"round {round_no}\n  origin B: {baseline['total_s']:6.1f} s = "
                  f"{n / baseline['total_s']:6.1f} img/s (embedding {baseline['embed_s']:.1f} s,"
                  f" index + neighbours {baseline['index_s']:.1f} s{meter.label()})")
            # The bound no pipeline can beat on this machine: the model alone, as the
            # in-memory run sets it up, with no decoding, I/O, index or start-up.
            with StealMeter() as meter:
                raw = measure_raw(args.model, engine, cores, batch, RAW_SECONDS, lanes=lanes)
            ceilings.append(baseline["total_s"] / (n / raw))
            print(f"  model alone ({engine}, batch {batch}, {cores} threads in {lanes} "
                  f"lane(s)): {raw:.1f} img/s"
                  f" -> ceiling {ceilings[-1]:.2f}x (inference only{meter.label()})")
            for i, (name, mode_args) in enumerate(modes.items()):
                with StealMeter() as meter:  # a fresh output each: nothing to reuse
                    ours = run([f"--input={manifest}",
                                f"--output={os.path.join(tmp, f'out{i}')}",
                                f"--model={args.model}", *mode_args])
                speedups[name].append(baseline["total_s"] / meter.seconds)
                shares[name].append(speedups[name][-1] / ceilings[-1])
                print(f"  pipeline: {meter.seconds:6.1f} s = {n / meter.seconds:6.1f} img/s "
                      f"(engine {ours['engine']}, {name}, start-up included"
                      f"{meter.label()}) -> speed-up {speedups[name][-1]:.2f}x "
                      f"= {shares[name][-1]:.0%} of the ceiling", flush=True)
    ceiling = statistics.median(ceilings)
    print(f"ceiling (the model alone): median {ceiling:.2f}x; 5x needs "
          f"{5 / ceiling:.0%} of it end to end")
    for name, values in speedups.items():
        print(f"speed-up, {name}: median {statistics.median(values):.2f}x over "
              f"{len(values)} round(s) ({', '.join(f'{v:.2f}' for v in values)}; "
              f"target >= 5x), {statistics.median(shares[name]):.0%} of the ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
