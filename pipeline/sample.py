"""A built-in sample catalogue that exists without internet.

``python -m pipeline.sample DIR`` writes ``DIR/catalog.csv`` and ``DIR/images/``:
photos that scikit-image ships inside its wheel, each as the original plus
three "sibling" copies a shop would have (a crop, a mirror image, a darker
low-quality re-encode), and one broken file. Run the pipeline on it and each
photo's siblings come back as its top neighbours, while the broken file shows
up in ``errors/`` — the whole contract, visible in seconds.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from importlib import resources

from PIL import Image, ImageEnhance, ImageOps

# (product name, file in skimage.data, category)
PHOTOS = (
    ("astronaut", "astronaut.png", "people"),
    ("cat", "chelsea.png", "animals"),
    ("coffee", "coffee.png", "food"),
    ("rocket", "rocket.jpg", "vehicles"),
    ("motorcycle", "motorcycle_left.png", "vehicles"),
    ("galaxy", "hubble_deep_field.jpg", "space"),
    ("retina", "retina.jpg", "medical"),
    ("coins", "coins.png", "objects"),
    ("bricks", "brick.png", "textures"),
    ("grass", "grass.png", "textures"),
)

VARIANTS = ("original", "crop", "mirror", "reencoded")


def _photo(filename: str) -> Image.Image:
    data = resources.files("skimage.data").joinpath(filename).read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB")


def _variant(image: Image.Image, variant: str) -> Image.Image:
    if variant == "crop":
        w, h = image.size
        return image.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    if variant == "mirror":
        return ImageOps.mirror(image)
    if variant == "reencoded":
        darker = ImageEnhance.Brightness(image).enhance(0.85)
        buffer = io.BytesIO()
        darker.save(buffer, format="JPEG", quality=35)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def write_sample(directory: str) -> str:
    """Write the sample catalogue into ``directory``; returns the manifest path."""
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    rows = []
    for name, filename, category in PHOTOS:
        photo = _photo(filename)
        for variant in VARIANTS:
            product_id = f"{name}-{variant}"
            path = os.path.join(images, f"{product_id}.jpg")
            _variant(photo, variant).save(path, format="JPEG", quality=90)
            rows.append({"product_id": product_id, "image": f"images/{product_id}.jpg",
                         "photo": name, "category": category, "variant": variant})
    broken = os.path.join(images, "broken-upload.jpg")
    with open(broken, "wb") as handle:
        handle.write(b"<html><body>502 Bad Gateway</body></html>")
    rows.append({"product_id": "broken-upload", "image": "images/broken-upload.jpg",
                 "photo": "", "category": "", "variant": "broken"})
    manifest = os.path.join(directory, "catalog.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    """Console entry: write the sample and say how to run the pipeline on it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write catalog.csv and images/")
    args = parser.parse_args(argv)
    manifest = write_sample(args.directory)
    n = len(PHOTOS) * len(VARIANTS) + 1
    print(f"Wrote a sample catalogue of {n} products to {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
