"""Which unsupervised recipe gives the best neighbours? Measured on cached arrays.

``python bench/quality_candidates.py embed [--catalog=…] [--cache=/tmp/quality_cache]``
decodes the shared products once and embeds them once per backbone view with the
pipeline's own decoder (white letterbox) and TFLite/XNNPACK, keeping the last feature
map so several poolings come from one pass:

* ``lite0`` / ``lite2`` at their native sizes: GAP, max and GeM (p=3) pooled, plain
  and horizontally flipped; the unflipped views also keep their whole last feature
  map (``<view>_map.npy``, float16 [N, h, w, 1280]) for the region-grid poolings of
  ``bench/quality_rerank.py``;
* ``lite0@288``: one extra scale (GAP);
* ``lite0_aug{1,2}``: two random augmentations per image (crop, flip, colour), the
  views a self-supervised projection head is trained on.

Each view is saved as ``CACHE/<view>.npy`` (float32, no pickle) with the seconds it
took and the CPU steal during it in ``CACHE/timings.json``; the arrays never go into
the repo.

``python bench/quality_candidates.py score [--cache=…]`` evaluates candidate recipes
purely on those arrays (numpy, seconds each) and prints one table: precision@10 by
articleType and by subCategory (labels only score: nothing is fitted to them), the
search dimension, and the embedding cost relative to ``fast`` (Lite0 GAP, one view)
from the timings of the same embed run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cpu_steal import StealMeter
from bench.quality_scores import read_catalog

DEFAULT_CATALOG = "/work/shared/data/products/catalog.csv"
DEFAULT_CACHE = "/tmp/quality_cache"
GEM_P = 3.0


def feature_map_tflite(variant: str, size: int, cache: str) -> str:
    """A TFLite model of the variant returning its last feature map [B, h, w, 1280]."""
    path = os.path.join(cache, "models", f"{variant}-{size}-map.tflite")
    if os.path.exists(path):
        return path
    import keras
    import tensorflow as tf

    from pipeline.models import efficientnet_lite
    from pipeline.models.torch_legacy import load_legacy_state_dict

    state = load_legacy_state_dict(efficientnet_lite.weights_path(variant))
    features, _ = efficientnet_lite.build_keras_models(state, size)
    fmap = keras.Model(features.input, features.get_layer("head_relu").output)
    converter = tf.lite.TFLiteConverter.from_keras_model(fmap)
    data = converter.convert()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as handle:
        handle.write(data)
    os.replace(path + ".tmp", path)
    return path


def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random view of a letterboxed image: crop-resize, flip, colour jitter, grey."""
    from PIL import Image, ImageEnhance

    size = pixels.shape[0]
    img = Image.fromarray(pixels)
    area = rng.uniform(0.35, 1.0) * size * size
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = int(min(size, round(np.sqrt(area * ratio))))
    h = int(min(size, round(np.sqrt(area / ratio))))
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    img = img.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _pool(fmap: np.ndarray) -> dict[str, np.ndarray]:
    """GAP, max and GeM pooling of [B, h, w, C] feature maps."""
    flat = fmap.reshape(len(fmap), -1, fmap.shape[-1]).astype(np.float64)
    gem = np.power(np.power(np.maximum(flat, 1e-6), GEM_P).mean(axis=1), 1 / GEM_P)
    return {"gap": flat.mean(axis=1), "max": flat.max(axis=1), "gem": gem}


def embed_view(rows, model_path: str, size: int, transform, pools, threads: int = 2):
    """Pooled features of every row's image under ``transform`` (pixels → pixels); the
    pool ``map`` is the whole feature map, kept as float16."""
    from pipeline.image_decode import decode_image
    from pipeline.models.engines import TfliteEngine

    engine = TfliteEngine(model_path, threads=threads, lanes=1)
    out = {p: np.zeros((len(rows), 1280), np.float32) for p in pools if p != "map"}
    batch = 8
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        pixels = []
        for row in chunk:
            with open(row["path"], "rb") as handle:
                pixels.append(transform(decode_image(handle.read(), size).pixels))
        fmap = np.asarray(engine.embed_pixels(pixels))
        pooled = _pool(fmap)
        if "map" in pools:
            if "map" not in out:
                out["map"] = np.zeros((len(rows),) + fmap.shape[1:], np.float16)
            out["map"][start:start + len(chunk)] = fmap
        for p in pools:
            if p != "map":
                out[p][start:start + len(chunk)] = pooled[p]
    return out


def cmd_embed(args) -> int:
    """Fill the cache: one pass per view, timed with the CPU steal printed."""
    rows = read_catalog(args.catalog)
    if args.limit:
        rows = rows[:args.limit]
    os.makedirs(args.cache, exist_ok=True)
    with open(os.path.join(args.cache, "ids.json"), "w") as handle:
        json.dump([r["product_id"] for r in rows], handle)
    timings_path = os.path.join(args.cache, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    def identity(p):
        return p
    def flip(p):
        return np.ascontiguousarray(p[:, ::-1])
    views = [
        ("lite0", "efficientnet_lite0", 224, identity, ("gap", "max", "gem", "map")),
        ("lite0_flip", "efficientnet_lite0", 224, flip, ("gap", "max", "gem")),
        ("lite2", "efficientnet_lite2", 260, identity, ("gap", "max", "gem", "map")),
        ("lite0_aug1", "efficientnet_lite0", 224, "aug1", ("gap",)),
        ("lite0_aug2", "efficientnet_lite0", 224, "aug2", ("gap",)),
        ("lite2_flip", "efficientnet_lite2", 260, flip, ("gap", "max", "gem")),
        ("lite0@288", "efficientnet_lite0", 288, identity, ("gap",)),
    ]
    for name, variant, size, transform, pools in views:
        if args.views and name not in args.views.split(","):
            continue
        if all(os.path.exists(os.path.join(args.cache, f"{name}_{p}.npy")) for p in pools):
            continue
        model = feature_map_tflite(variant, size, args.cache)
        if isinstance(transform, str):
            rng = np.random.default_rng(int(transform[-1]))
            def transform(p, rng=rng):
                return augment(p, rng)
        with StealMeter() as meter:
            pooled = embed_view(rows, model, size, transform, pools, args.threads)
        for p, array in pooled.items():
            np.save(os.path.join(args.cache, f"{name}_{p}.npy"), array, allow_pickle=False)
        timings[name] = {"seconds": round(meter.seconds, 2), "steal": meter.steal,
                         "images": len(rows)}
        with open(timings_path, "w") as handle:
            json.dump(timings, handle, indent=1)
        print(f"{name}: {len(rows)} images in {meter.seconds:.1f} s{meter.label()}",
              flush=True)
    return 0


def main(argv=None) -> int:
    """Console entry: ``embed`` fills the cache, ``score`` prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed")
    embed.add_argument("--catalog", default=DEFAULT_CATALOG)
    embed.add_argument("--cache", default=DEFAULT_CACHE)
    embed.add_argument("--views", default="", help="comma-separated subset of views")
    embed.add_argument("--limit", type=int, default=0)
    embed.add_argument("--threads", type=int, default=2)
    score = sub.add_parser("score")
    score.add_argument("--catalog", default=DEFAULT_CATALOG)
    score.add_argument("--cache", default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    if args.command == "embed":
        return cmd_embed(args)
    from bench.quality_scores import cmd_score

    return cmd_score(args)


if __name__ == "__main__":
    sys.exit(main())
