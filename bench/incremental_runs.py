"""Nightly cycle on real data: a full run, then a run after 5 % of the catalogue changed.

    python bench/incremental_runs.py [--products ../shared/data/products] [--change 0.05]
                                     [--workers 2]

Run 1 embeds the whole catalogue. Then 5 % of it changes (a third of that each: new
products, removed products, replaced images — written to a temp dir, the shared data
is not touched); run 2 reuses the first run's embeddings for unchanged images; run 3 is a
full rebuild of the changed catalogue into another root. Prints both run times, the share
of embeddings reused, and whether run 2's neighbours equal run 3's byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_PRODUCTS = REPO.parent / "shared" / "data" / "products"


def _rows(products: Path) -> list[dict]:
    with open(products / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["image"] = str(products / row["image"])
    return rows


def _write(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def changed_catalogue(rows: list[dict], share: float, directory: str, seed: int = 0):
    """The catalogue after a day of changes: new, removed and re-photographed products."""
    rng = random.Random(seed)
    n_each = max(1, round(len(rows) * share / 3))
    picked = rng.sample(range(len(rows)), 3 * n_each)
    removed = set(picked[:n_each])
    replaced = picked[n_each:2 * n_each]
    sources = picked[2 * n_each:]
    out = [dict(r) for i, r in enumerate(rows) if i not in removed]
    by_id = {r["product_id"]: r for r in out}
    for i in replaced:  # the shop uploaded a new photo (here: mirrored and re-cropped)
        row = by_id[rows[i]["product_id"]]
        image = ImageOps.mirror(Image.open(row["image"]).convert("RGB"))
        w, h = image.size
        path = os.path.join(directory, f"replaced-{row['product_id']}.jpg")
        image.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(path, quality=90)
        row["image"] = path
    for n, i in enumerate(sources):  # new products, photographed like existing ones
        row = dict(rows[i], product_id=f"new-{n:05d}")
        path = os.path.join(directory, f"new-{n:05d}.jpg")
        ImageOps.flip(Image.open(rows[i]["image"]).convert("RGB")).save(path, quality=90)
        row["image"] = path
        out.append(row)
    return out, {"removed": len(removed), "replaced": len(replaced), "new": len(sources)}


def _timed_run(args: list[str]) -> tuple[dict, float]:
    from pipeline.run import run

    started = time.perf_counter()
    manifest = run(args)
    return manifest, time.perf_counter() - started


def _neighbor_bytes(run_dir: str) -> dict:
    paths = sorted(glob.glob(os.path.join(run_dir, "neighbors", "*.jsonl"))
                   + glob.glob(os.path.join(run_dir, "similar_products-*.jsonl")))
    return {os.path.relpath(p, run_dir): open(p, "rb").read() for p in paths}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=Path, default=DEFAULT_PRODUCTS)
    parser.add_argument("--change", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args(argv)
    if not (args.products / "catalog.csv").exists():
        print(f"no catalogue at {args.products}; pass --products", file=sys.stderr)
        return 2
    beam_args = [f"--model={args.model}", f"--direct_num_workers={args.workers}",
                 "--direct_running_mode=multi_processing"]
    with tempfile.TemporaryDirectory(prefix="incremental-bench-") as tmp:
        rows = _rows(args.products)
        day1 = _write(os.path.join(tmp, "day1.csv"), rows)
        changed, kinds = changed_catalogue(rows, args.change, tmp)
        day2 = _write(os.path.join(tmp, "day2.csv"), changed)
        root, fresh = os.path.join(tmp, "root"), os.path.join(tmp, "fresh")

        first, t1 = _timed_run([f"--input={day1}", f"--output={root}", *beam_args])
        second, t2 = _timed_run([f"--input={day2}", f"--output={root}", *beam_args])
        third, t3 = _timed_run([f"--input={day2}", f"--output={fresh}", "--full_rebuild",
                                *beam_args])
        counts = second["counts"]
        same = _neighbor_bytes(second["run_dir"]) == _neighbor_bytes(third["run_dir"])
    print(f"catalogue: {len(rows)} products; day 2 changes: {kinds}")
    print(f"run 1 (full):         {t1:7.1f} s   embedded {first['counts']['embedded']}")
    print(f"run 2 (incremental):  {t2:7.1f} s   reused {counts['reused']}, newly embedded "
          f"{counts['newly_embedded']}, removed {counts['removed']}")
    print(f"run 3 (full rebuild): {t3:7.1f} s")
    print(f"reused share: {counts['reused'] / counts['embedded']:.3f}   "
          f"time ratio run2/run1: {t2 / t1:.2f}   run2/run3: {t2 / t3:.2f}")
    print(f"neighbours of run 2 == full rebuild (byte for byte): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
