"""Recall of the IVF neighbour stage on real embeddings with near-duplicates.

Usage::

    python bench/ivf_real_recall.py [--n 1500] [--catalog /work/shared/data/products/catalog.csv]

Takes the first ``--n`` products of the shared catalogue, writes three
augmented copies of each image (a centre crop of 85 %, a mirror image, a
colour-jittered copy: brightness, contrast and saturation x0.7-1.3), embeds
originals and copies with ``pipeline.run --features_only`` (the default
model), then compares the IVF all-kNN (``pipeline/ivf.py`` with its default
nlist and calibrated nprobe) against exact search on every product: recall@20
(tie-tolerant: a neighbour counts when it is at least as similar as exact
search's 20th). Catalogues full of near-duplicates are where a list boundary
can split a product from its copies, so this is the hard case for IVF.
Skips with a message when the shared data are absent.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline import ivf, similarity_search  # noqa: E402
from pipeline.features import read_feature_matrix  # noqa: E402


def augment(src: str, out_dir: str, stem: str, rng: np.random.Generator) -> list[str]:
    """Write the crop, mirror and colour-jitter copies of one image; return their paths."""
    from PIL import Image, ImageEnhance, ImageOps

    with Image.open(src) as img:
        img = img.convert("RGB")
        w, h = img.size
        dx, dy = int(w * 0.075), int(h * 0.075)
        copies = {
            "crop": img.crop((dx, dy, w - dx, h - dy)),
            "flip": ImageOps.mirror(img),
            "jitter": ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(img)
                                         .enhance(rng.uniform(0.7, 1.3)))
                                         .enhance(rng.uniform(0.7, 1.3)))
            .enhance(rng.uniform(0.7, 1.3)),
        }
        paths = []
        for name, copy in copies.items():
            path = os.path.join(out_dir, f"{stem}_{name}.jpg")
            copy.save(path, quality=90)
            paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--catalog", default="/work/shared/data/products/catalog.csv")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    if not os.path.exists(args.catalog):
        print(f"skipped: {args.catalog} not found")
        return
    base = os.path.dirname(args.catalog)
    with open(args.catalog, newline="") as handle:
        rows = list(csv.DictReader(handle))[: args.n]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        manifest = os.path.join(tmp, "catalog.csv")
        with open(manifest, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["product_id", "image"])
            for row in rows:
                src = os.path.join(base, row["image"])
                writer.writerow([row["product_id"], src])
                for i, path in enumerate(augment(src, images, row["product_id"], rng)):
                    writer.writerow([f"{row['product_id']}_{i}", path])
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.run", f"--input={manifest}",
                        f"--output={tmp}/out", "--features_only"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        embed_s = time.perf_counter() - t0
        paths = sorted(glob.glob(f"{tmp}/out/LATEST/features/*.parquet"))
        matrix = read_feature_matrix(paths)
    v = matrix.vectors
    n = len(v)
    t0 = time.perf_counter()
    _, exact_sims = similarity_search.exact_top_k(v, v, args.k, query_rows=np.arange(n))
    exact_s = time.perf_counter() - t0
    print(f"{n} vectors ({len(rows)} products + 3 augmented copies each), D={v.shape[1]}, "
          f"embedded in {embed_s:.0f} s; exact all-kNN {exact_s:.1f} s")
    print(f"{'nlist':>6} {'nprobe':>6} {'recall@' + str(args.k):>9} {'seconds':>8}")
    for nlist, nprobe in ((0, 0), (0, 1), (0, 2), (0, 4)):
        t0 = time.perf_counter()
        _, sims, info = ivf.ivf_all_knn(v, args.k, nlist=nlist or ivf.default_nlist(n) or 1,
                                        nprobe=nprobe)
        seconds = time.perf_counter() - t0
        recall = float((sims >= exact_sims[:, -1:] - 1e-6).mean())
        label = f"{info['nprobe']}{' (auto)' if not nprobe else ''}"
        print(f"{info['nlist']:>6} {label:>6} {recall:>9.4f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
