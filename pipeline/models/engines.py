"""How a model runs on a worker: TensorFlow SavedModel, the TFLite (LiteRT) interpreter, numpy.

On CPUs, the LiteRT interpreter with XNNPACK runs the same float32 network
faster than TensorFlow eager/graph execution (``bench/embed_throughput.py``,
figures in bench/MEASUREMENTS.md), so a model is converted once to a float32
``.tflite`` file, cached next to the SavedModel, and used when its embeddings
match the SavedModel's on a probe batch (that check and its record are the
model handler's, :mod:`pipeline.models.handler`). Every engine exposes the same
call: float32 [B, S, S, 3] images in [0, 1] → float32 [B, D] features, and
``embed_pixels`` for what the pipeline holds: a list of uint8 [S, S, 3] images.
"""

from __future__ import annotations

import contextlib
import os
import queue
from typing import Callable

import numpy as np

from pipeline import logs
from pipeline.models import cache

ENGINES = ("auto", "tflite", "savedmodel")
TFLITE_FILE = "model.tflite"
# Bump when the conversion changes, so older cached conversions are not reused.
TFLITE_CONVERSION_VERSION = 1


# Images per model call where --batch_size is not given: what ran fastest per engine
# in ``bench/embed_throughput.py`` (figures in bench/MEASUREMENTS.md). TFLite/XNNPACK
# keeps a small batch's activations in the per-core caches; TensorFlow pays a fixed
# cost per call, so it wants bigger batches.
# The numpy engine (the raw-pixel baseline) was not measured: it takes the SavedModel's.
PREFERRED_BATCH = {"tflite": 2, "savedmodel": 8, "numpy": 8}


def configure_tf_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools so worker processes don't oversubscribe cores.

    Must run before TensorFlow starts its runtime in the process; if it already
    has (an in-process runner that loaded the model at start-up), it is a no-op.
    """
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:
        pass


def preferred_batch(engine: str) -> int:
    """Images per model call that ran fastest for this engine where it was measured."""
    return PREFERRED_BATCH[engine]


def lanes_for(engine: str, threads: int, requested: int = 0) -> int:
    """Model calls a worker process runs at once: ``requested`` (--model_lanes), or
    where that is 0 what measured fastest.

    TFLite: one single-threaded interpreter per thread, which ran faster than one
    interpreter using every thread (a batch of 2 leaves XNNPACK's threads waiting on
    each other; ``bench/embed_throughput.py``, figures in bench/MEASUREMENTS.md), and
    each lane runs while the process reads and decodes the next images. The
    SavedModel engine always runs one call at a time: TensorFlow spreads it over
    its own thread pools.
    """
    if engine != "tflite":
        return 1
    return requested or max(1, threads)


# uint8 pixel values → the [0, 1] floats every engine takes.
PIXEL_SCALE = np.float32(1 / 255.0)


def unit_floats(pixels: list[np.ndarray]) -> np.ndarray:
    """A float32 [B, S, S, 3] batch in [0, 1] from uint8 [S, S, 3] images."""
    return np.stack(pixels).astype(np.float32) * PIXEL_SCALE


class SavedModelEngine:
    """Runs a TF-Hub-convention SavedModel (as loaded by ``tensorflow_hub.load``)."""

    name = "savedmodel"
    lanes = 1  # TensorFlow spreads one call over its own thread pools

    def __init__(self, model):
        self.model = model

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        out = self.model(tf.constant(images, dtype=tf.float32))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return np.asarray(out, dtype=np.float32)

    def embed_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Features of uint8 [S, S, 3] images."""
        return self(unit_floats(pixels))


class NumpyEngine:
    """Runs a model written as a numpy function of the images; never starts TensorFlow."""

    name = "numpy"
    lanes = 1

    def __init__(self, function: Callable[[np.ndarray], np.ndarray]):
        self.function = function

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.function(images), dtype=np.float32)

    def embed_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Features of uint8 [S, S, 3] images."""
        return self(unit_floats(pixels))


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # LiteRT not installed: TensorFlow's own (deprecated) interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


class _Interpreter:
    """One TFLite interpreter and the batch size its tensors are planned for."""

    def __init__(self, path: str, threads: int | None):
        self.interpreter = _interpreter_class()(model_path=path, num_threads=threads)
        # The first allocation creates the XNNPACK delegate (and prints its INFO line,
        # filtered by the caller), so do it here rather than in the first batch.
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = None

    def resize(self, shape) -> None:
        if shape[0] != self._batch:
            self.interpreter.resize_tensor_input(self.input["index"], list(shape))
            self.interpreter.allocate_tensors()
            self._batch = shape[0]

    def invoke(self) -> np.ndarray:
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output["index"]), dtype=np.float32)


class TfliteEngine:
    """Runs a float32 ``.tflite`` model; the batch dimension is resized on demand.

    ``lanes`` interpreters share the ``threads``: that many calls run at once
    (the interpreter releases the GIL while it runs), each on its own
    interpreter, so one process can keep every core busy with single-threaded
    interpreters while its main thread reads and decodes the next images.
    """

    name = "tflite"

    def __init__(self, path: str, threads: int = 0, lanes: int = 1):
        self.path = path
        self.lanes = max(1, lanes)
        per_lane = max(1, threads // self.lanes) if threads > 0 else None
        # Free interpreters. One engine per process is shared by every DoFn instance
        # and thread in it, and an interpreter must not run two calls at once.
        # TFLite prints an INFO line per interpreter on stderr whatever the log level.
        with logs.native_noise_filtered():
            interpreters = [_Interpreter(path, per_lane) for _ in range(self.lanes)]
        self._input, self._output = interpreters[0].input, interpreters[0].output
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for interpreter in interpreters:
            self._free.put(interpreter)

    @contextlib.contextmanager
    def _lane(self):
        lane = self._free.get()
        try:
            yield lane
        finally:
            self._free.put(lane)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        with self._lane() as lane:
            lane.resize(images.shape)
            lane.interpreter.set_tensor(lane.input["index"], images)
            return lane.invoke()

    def embed_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Features of uint8 [S, S, 3] images, scaled straight into the input tensor.

        One pass over the pixels instead of four (stack, cast, scale, copy in).
        """
        size = tuple(self._input["shape"][1:])
        for image in pixels:
            if image.shape != size:
                raise ValueError(f"image has shape {image.shape}; the model takes {size}")
        with self._lane() as lane:
            lane.resize((len(pixels),) + size)
            batch = lane.interpreter.tensor(lane.input["index"])()
            try:
                for i, image in enumerate(pixels):
                    np.multiply(image, PIXEL_SCALE, out=batch[i], dtype=np.float32)
            finally:
                del batch  # the interpreter refuses to run while a view of it is held
            return lane.invoke()


def _convert(savedmodel_dir: str, target_dir: str) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    data = converter.convert()
    with open(os.path.join(target_dir, TFLITE_FILE), "wb") as handle:
        handle.write(data)


def _tflite_entry(model_id: str) -> str:
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
    return f"tflite-{safe_id}-c{TFLITE_CONVERSION_VERSION}"


def ensure_tflite(savedmodel_dir: str, model_id: str, cache_dir: str | None = None) -> str:
    """Path of the model's cached float32 ``.tflite`` conversion (converted on first use)."""
    directory = cache.ensure_cached_dir(_tflite_entry(model_id),
                                        lambda tmp: _convert(savedmodel_dir, tmp),
                                        root=cache_dir)
    return os.path.join(directory, TFLITE_FILE)


def cached_tflite(model_id: str, cache_dir: str | None = None) -> str | None:
    """Path of the model's cached ``.tflite`` conversion if an intact one exists, else None.

    Why: a fast start-up path may use the conversion only as it is; this never
    converts or writes anything (:func:`ensure_tflite` does).
    """
    directory = cache.lookup(_tflite_entry(model_id), cache_dir)
    return None if directory is None else os.path.join(directory, TFLITE_FILE)


def tflite_shapes(engine: "TfliteEngine") -> tuple[int, int]:
    """(input size, output dimension) a TFLite model declares."""
    input_shape = engine._input["shape"]
    output_shape = engine._output["shape"]
    return int(input_shape[1]), int(output_shape[-1])


def probe_images(size: int, count: int = 4) -> np.ndarray:
    """A fixed batch of smooth random images for comparing engines."""
    rng = np.random.default_rng(1234)
    coarse = rng.random((count, 8, 8, 3)).astype(np.float32)
    return np.repeat(np.repeat(coarse, size // 8 + 1, axis=1), size // 8 + 1, axis=2)[
        :, :size, :size, :]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity between two feature batches."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))
