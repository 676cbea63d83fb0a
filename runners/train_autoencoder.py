"""Train one of the origins' autoencoders on a catalogue and export its encoder.

``python -m runners.train_autoencoder --input=CATALOG --output=MODEL_DIR
[--arch=conv16|pool128] [--image_size=…] [--latent_dim=…] [--input_size=224]
[--epochs=…] [--batch_size=…] [--validation_split=0.2] [--patience=3] [--seed=0]
[--limit=N]``

The catalogue is any input the pipeline reads (CSV/JSONL/Parquet manifest or
an image glob). Images are read and decoded lazily, one at a time, by a
generator behind ``tf.data`` (never the whole catalogue in memory), with the
pipeline's own :func:`~pipeline.image_decode.decode_image`; rows whose image cannot
be read or decoded are skipped and counted by reason. Products go to the
validation set by a hash of their id, so the split never changes between runs.
Training stops early when the validation loss has not improved for
``--patience`` epochs and keeps the best epoch's weights.

``MODEL_DIR`` then holds the encoder as a TF-Hub feature-vector SavedModel
(``python -m pipeline.run --model=MODEL_DIR`` embeds with it), ``training.json``
(per-epoch loss/val_loss and time, best and final validation loss, the skipped
images, every setting), ``training.png`` (the curve) and
``reconstructions.png`` (validation images above their reconstructions).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import platform
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw

from pipeline import files
from pipeline.catalog import CatalogError, ManifestRowReader, inspect_catalog
from pipeline.image_decode import DecodeError, decode_image
from pipeline.locations import is_url
from pipeline.models import autoencoder as ae

TRAINING_FILE = "training.json"
CURVE_FILE = "training.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"
DEFAULT_EPOCHS = {"conv16": 6, "pool128": 30}


class TrainingError(RuntimeError):
    """Training cannot start or produced nothing; the message says what to change."""


@dataclass(frozen=True)
class ImageRow:
    """One catalogue product to train on."""

    product_id: str
    image: str


def catalog_rows(input_path: str, id_column: str = "product_id",
                 image_column: str = "image") -> tuple[list[ImageRow], Counter]:
    """The usable ``(product_id, image)`` rows of a catalogue, and unusable rows by reason.

    Why: training reads exactly what the pipeline would embed, through the
    same catalogue reader, so a model is trained on the products it serves.
    """
    info = inspect_catalog(input_path, id_column, image_column)
    invalid: Counter = Counter()
    if info.kind == "glob":
        matched = FileSystems.match([input_path])[0].metadata_list
        rows = [ImageRow(m.path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0], m.path)
                for m in matched]
        return sorted(rows, key=lambda r: r.product_id), invalid
    rows = []
    for raw in ManifestRowReader(info).rows(input_path):
        if raw.invalid:
            invalid[f"catalog:{raw.invalid[0]}"] += 1
        elif is_url(raw.image):
            invalid["read:url_not_supported"] += 1
        else:
            rows.append(ImageRow(raw.product_id, raw.image))
    return rows, invalid


def in_validation(product_id: str, validation_split: float) -> bool:
    """Whether a product belongs to the validation set: a stable hash of its id.

    Why: the split must not depend on catalogue order, seed or machine, so a
    product never moves between training and validation across retrainings.
    """
    digest = hashlib.sha256(product_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < validation_split


@dataclass
class ImageStream:
    """Re-iterable stream of decoded images for ``tf.data.Dataset.from_generator``.

    Each pass shuffles the row order (seeded, different per pass) when
    ``shuffle`` is set; an image that fails to read or decode is skipped and
    recorded once in the shared ``skipped`` dict, and not read again.
    """

    rows: list
    size: int
    seed: int = 0
    shuffle: bool = False
    skipped: dict = field(default_factory=dict)
    passes: int = 0

    def __call__(self):
        order = np.arange(len(self.rows))
        if self.shuffle:
            np.random.default_rng([self.seed, self.passes]).shuffle(order)
        self.passes += 1
        for i in order:
            row = self.rows[i]
            if row.product_id in self.skipped:
                continue
            pixels = self._load(row)
            if pixels is not None:
                yield pixels

    def _load(self, row: ImageRow):
        try:
            with FileSystems.open(row.image) as handle:
                data = handle.read()
        except Exception as exc:  # noqa: BLE001 - any read failure skips the product
            missing = isinstance(exc, FileNotFoundError) or "not found" in str(exc).lower() \
                or "no such file" in str(exc).lower()
            self.skipped[row.product_id] = "read:missing_file" if missing else "read:error"
            return None
        try:
            return decode_image(data, self.size).pixels
        except DecodeError as exc:
            self.skipped[row.product_id] = f"decode:{exc.reason}"
            return None


def make_dataset(stream: ImageStream, config: ae.AutoencoderConfig, batch_size: int):
    """``(x, x)`` batches of preprocessed images, decoded lazily and prefetched."""
    import tensorflow as tf

    spec = tf.TensorSpec((config.input_size, config.input_size, 3), tf.uint8)
    dataset = tf.data.Dataset.from_generator(stream, output_signature=spec)

    def prepare(batch):
        x = ae.preprocess(tf.cast(batch, tf.float32) / 255.0, config)
        return x, x

    return (dataset.batch(batch_size)
            .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def _history_callback(monitor: str, log: list, best: dict, total_epochs: int, skipped: dict):
    """Record each epoch, keep the best weights in memory, print one line per epoch."""
    from tensorflow import keras

    class History(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            if "loss" not in logs or monitor not in logs:
                # Keras reports no loss for a set that yielded no batch.
                reasons = dict(Counter(skipped.values()))
                raise TrainingError(f"no readable image in the training or validation set "
                                    f"({len(skipped)} skipped: {reasons})")
            entry = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._started, 2),
                     "loss": float(logs["loss"])}
            if "val_loss" in logs:
                entry["val_loss"] = float(logs["val_loss"])
            log.append(entry)
            value = entry.get(monitor)
            if value is not None and np.isfinite(value) and value < best.get("value", np.inf):
                best.update(value=value, epoch=epoch + 1, weights=self.model.get_weights())
            shown = "  ".join(f"{k} {entry[k]:.5f}" for k in ("loss", "val_loss") if k in entry)
            print(f"epoch {epoch + 1}/{total_epochs}  {shown}  ({entry['seconds']:.1f} s)",
                  flush=True)

    return History()


def train(args: argparse.Namespace) -> dict:
    """Train, keep the best epoch, export the encoder; returns the training.json document."""
    import tensorflow as tf
    from tensorflow import keras

    try:
        config = ae.make_config(args.arch, args.image_size, args.latent_dim, args.input_size)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    epochs = args.epochs or DEFAULT_EPOCHS[args.arch]
    batch_size = args.batch_size or ae.PRESETS[args.arch]["batch_size"]
    if not 0.0 <= args.validation_split < 1.0:
        raise TrainingError(f"--validation_split must be in [0, 1), got {args.validation_split}")
    if epochs < 1 or batch_size < 1 or args.patience < 1:
        raise TrainingError("--epochs, --batch_size and --patience must be at least 1")
    try:
        rows, invalid = catalog_rows(args.input, args.id_column, args.image_column)
    except CatalogError as exc:
        raise TrainingError(str(exc)) from exc
    if args.limit:
        rows = rows[:args.limit]
    val_rows = [r for r in rows if in_validation(r.product_id, args.validation_split)]
    train_rows = [r for r in rows if not in_validation(r.product_id, args.validation_split)]
    if not train_rows:
        raise TrainingError(f"{args.input} has no usable image rows to train on")
    if args.validation_split > 0 and not val_rows:
        raise TrainingError(
            f"none of the {len(rows)} products hashed into the {args.validation_split:.0%} "
            f"validation split; use more products or --validation_split=0")

    keras.utils.set_random_seed(args.seed)
    autoencoder, encoder = ae.build(config)
    autoencoder.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                        loss=ae.loss_for(config))
    skipped: dict = {}
    train_stream = ImageStream(train_rows, config.input_size, args.seed, True, skipped)
    val_stream = ImageStream(val_rows, config.input_size, args.seed, False, skipped)
    train_data = make_dataset(train_stream, config, batch_size)
    val_data = make_dataset(val_stream, config, batch_size) if val_rows else None
    monitor = "val_loss" if val_rows else "loss"
    log: list = []
    best: dict = {}
    callbacks = [_history_callback(monitor, log, best, epochs, skipped),
                 keras.callbacks.EarlyStopping(monitor=monitor, patience=args.patience)]
    print(f"training {config.arch} ({autoencoder.count_params():,} parameters, "
          f"{config.latent_dim}-d code) on {len(train_rows)} images, validating on "
          f"{len(val_rows)}; batch {batch_size}, up to {epochs} epochs", flush=True)
    started = time.perf_counter()
    # The stream's length is unknown until its first pass (bad images are
    # skipped); Keras warns about that, and about shuffle, which the stream does.
    warnings.filterwarnings("ignore", message=".*(ran out of data|`shuffle=True` was passed).*")
    autoencoder.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks,
                    verbose=0)
    train_seconds = time.perf_counter() - started
    if "weights" not in best:
        raise TrainingError(f"the {monitor} never was a finite number; lower --learning_rate")
    autoencoder.set_weights(best["weights"])

    files.makedirs(args.output)
    export_started = time.perf_counter()
    ae.export_encoder(encoder, config, args.output)
    export_seconds = time.perf_counter() - export_started
    skipped_by_reason = Counter(skipped.values()) + invalid
    report = {
        "arch": config.arch,
        "config": config.to_dict(),
        "parameters": {"autoencoder": int(autoencoder.count_params()),
                       "encoder": int(encoder.count_params())},
        "settings": {"input": args.input, "epochs": epochs, "batch_size": batch_size,
                     "learning_rate": args.learning_rate, "optimizer": "adam",
                     "validation_split": args.validation_split, "patience": args.patience,
                     "seed": args.seed, "limit": args.limit, "monitor": monitor},
        "images": {
            "catalog_rows": len(rows) + sum(invalid.values()),
            "train": sum(1 for r in train_rows if r.product_id not in skipped),
            "validation": sum(1 for r in val_rows if r.product_id not in skipped),
            "skipped": sum(skipped_by_reason.values()),
            "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
            "skipped_examples": dict(sorted(skipped.items())[:20]),
        },
        "history": log,
        "epochs_run": len(log),
        "stopped_early": len(log) < epochs,
        "best_epoch": best["epoch"],
        f"best_{monitor}": round(best["value"], 6),
        "final_val_loss": round(best["value"], 6) if val_rows else None,
        "last_epoch_val_loss": log[-1].get("val_loss"),
        "timings": {"train_seconds": round(train_seconds, 2),
                    "seconds_per_epoch": round(train_seconds / len(log), 2),
                    "export_seconds": round(export_seconds, 2)},
        "versions": {"tensorflow": tf.__version__, "python": platform.python_version()},
    }
    files.write_json(files.join(args.output, TRAINING_FILE), report)
    files.write_bytes(files.join(args.output, CURVE_FILE), curve_png(log, best["epoch"]))
    files.write_bytes(files.join(args.output, RECONSTRUCTIONS_FILE),
                      reconstructions_png(autoencoder, config, val_rows or train_rows, skipped))
    return report


def curve_png(history: list, best_epoch: int, width: int = 640, height: int = 360) -> bytes:
    """The training curve (loss and val_loss per epoch) as PNG bytes, drawn with Pillow."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 20, width - 20, height - 50
    series = {"loss": (31, 119, 180), "val_loss": (255, 127, 14)}
    values = [e[k] for e in history for k in series if k in e and np.isfinite(e[k])]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    n = max(len(history), 2)

    def point(i, value):
        x = left + (right - left) * i / (n - 1)
        y = bottom - (bottom - top) * (value - low) / (high - low)
        return x, y

    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    for frac in (0.0, 0.5, 1.0):
        value = low + (high - low) * frac
        y = bottom - (bottom - top) * frac
        draw.text((5, y - 6), f"{value:.4g}", fill=(60, 60, 60))
    for i, entry in enumerate(history):
        x, _ = point(i, low)
        draw.text((x - 4, bottom + 6), str(entry["epoch"]), fill=(60, 60, 60))
    if 1 <= best_epoch <= len(history):
        x, _ = point(best_epoch - 1, low)
        draw.line([x, top, x, bottom], fill=(200, 200, 200))
    for offset, (key, colour) in enumerate(series.items()):
        points = [point(i, e[key]) for i, e in enumerate(history) if key in e]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if points:
            draw.text((left + 10 + 90 * offset, height - 22), key, fill=colour)
    draw.text((left + 200, height - 22), f"epoch (best: {best_epoch})", fill=(60, 60, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reconstructions_png(autoencoder, config: ae.AutoencoderConfig, rows: list,
                        skipped: dict, count: int = 8) -> bytes:
    """Up to ``count`` images (top) above their reconstructions (bottom), as PNG bytes."""
    stream = ImageStream([r for r in rows if r.product_id not in skipped][:count * 2],
                         config.input_size)
    pixels = [p for _, p in zip(range(count), stream())]
    if not pixels:
        return curve_png([], 0)
    batch = ae.preprocess(np.stack(pixels).astype(np.float32) / 255.0, config)
    recon = np.asarray(ae.reconstruct(autoencoder, batch, config))
    tiles = np.concatenate([np.asarray(batch), recon], axis=0)
    side = config.image_size
    scale = max(1, 96 // side)
    sheet = Image.new("RGB", (len(pixels) * side * scale, 2 * side * scale), "white")
    for i, tile in enumerate(tiles):
        grid = np.clip(np.rint(tile * 255), 0, 255).astype(np.uint8)
        picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        picture = picture.convert("RGB").resize((side * scale, side * scale), Image.NEAREST)
        sheet.paste(picture, ((i % len(pixels)) * side * scale, (i // len(pixels)) * side * scale))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="catalogue: manifest or image glob")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--arch", choices=ae.ARCHITECTURES, default="conv16")
    parser.add_argument("--image_size", type=int, help="side the network sees "
                        "(conv16: 128, pool128: 28)")
    parser.add_argument("--latent_dim", type=int, help="code length (conv16: 16; pool128 is "
                        "fixed by its pooling: 128 at 28×28)")
    parser.add_argument("--input_size", type=int, default=ae.DEFAULT_INPUT_SIZE,
                        help="side of the images the exported model accepts; the pipeline "
                             "decodes to it (default 224, as for the other models)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (conv16: 6, pool128: 30)")
    parser.add_argument("--batch_size", type=int, help="conv16: 32, pool128: 400")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--validation_split", type=float, default=0.2)
    parser.add_argument("--patience", type=int, default=3,
                        help="stop after this many epochs without a better validation loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="train on the first N catalogue rows only")
    parser.add_argument("--id_column", default="product_id")
    parser.add_argument("--image_column", default="image")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Console entry: train, export, print where everything went."""
    args = parse_args(argv)
    try:
        report = train(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = report["images"]
    print(f"best epoch {report['best_epoch']} of {report['epochs_run']}: "
          f"val_loss {report['final_val_loss']}; trained in "
          f"{report['timings']['train_seconds']:.1f} s; {images['skipped']} images skipped "
          f"{images['skipped_by_reason'] or ''}")
    print(f"encoder ({report['config']['latent_dim']}-d) written to {args.output}; embed with: "
          f"python -m pipeline.run --input=… --output=… --model={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
