"""Convolutional autoencoders trained on the catalogue itself, and their encoder export.

Two presets reproduce the autoencoders of the project's origins:

* ``conv16`` (origin A): RGB at ``image_size`` (256 originally, 128 by default
  here so it trains on a laptop CPU); encoder Conv2D 32/64/64 3×3 stride 2,
  each followed by LeakyReLU(0.2) and BatchNorm; a Dense 16-d code named
  ``latent_space``; a mirrored Conv2DTranspose decoder with a sigmoid output;
  mean squared error.
* ``pool128`` (origin C): 28×28 grey; encoder three 3×3 conv + ReLU + 2×2 max
  pool stages with 16, 8, 8 filters, so the code is 4×4×8 = 128 values; the
  decoder upsamples by nearest neighbour (to 7, 14, 28) between 3×3 convs and
  ends in one logit channel; sigmoid cross-entropy.

Only the encoder is exported, as a SavedModel in the TF-Hub image
feature-vector convention the pipeline loads every model with: ``obj(images)``
takes float32 ``[B, S, S, 3]`` in ``[0, 1]`` (S = the declared input size,
224 by default, like the other models) and returns ``[B, latent]``; the
module itself converts to grey and/or resizes to the architecture's image
size with :func:`preprocess`, the very function training feeds images
through, so serving sees exactly what training saw.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

ARCHITECTURES = ("conv16", "pool128")
LATENT_LAYER = "latent_space"


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything that defines one architecture instance (stored in training.json)."""

    arch: str
    image_size: int  # side of the square the network sees
    channels: int  # 3 (RGB) or 1 (grey)
    latent_dim: int
    input_size: int  # side of the images the exported module accepts
    loss: str  # "mse" or "sigmoid_cross_entropy"

    def to_dict(self) -> dict:
        """Plain values for JSON."""
        return asdict(self)


# Per preset: default image size, latent size (pool128's follows from its pooling),
# batch size (the origins'), channels and loss.
PRESETS: dict[str, dict[str, Any]] = {
    "conv16": {"image_size": 128, "latent_dim": 16, "batch_size": 32, "channels": 3,
               "loss": "mse"},
    "pool128": {"image_size": 28, "latent_dim": None, "batch_size": 400, "channels": 1,
                "loss": "sigmoid_cross_entropy"},
}
DEFAULT_INPUT_SIZE = 224
_CONV16_FILTERS = (32, 64, 64)
_POOL128_FILTERS = (16, 8, 8)


def pool128_code_size(image_size: int) -> int:
    """Length of the pool128 code: three 'same' 2×2 poolings of the image, 8 channels."""
    side = image_size
    for _ in _POOL128_FILTERS:
        side = math.ceil(side / 2)
    return side * side * _POOL128_FILTERS[-1]


def make_config(arch: str, image_size: int | None = None, latent_dim: int | None = None,
                input_size: int = DEFAULT_INPUT_SIZE) -> AutoencoderConfig:
    """Fill a preset's defaults and refuse combinations the architecture cannot build.

    Why: the CLI accepts overrides, and a wrong one (a pool128 latent size that
    its pooling cannot produce, an image size conv16's three stride-2 stages
    cannot mirror) must fail before any image is read.
    """
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    preset = PRESETS[arch]
    size = int(image_size or preset["image_size"])
    if size < 8 or input_size < 8:
        raise ValueError("image sizes must be at least 8 pixels")
    if arch == "conv16":
        if size % 8:
            raise ValueError(f"conv16 needs an image size divisible by 8 (three stride-2 "
                             f"stages mirrored by the decoder), got {size}")
        latent = int(latent_dim or preset["latent_dim"])
        if latent < 1:
            raise ValueError(f"latent_dim must be positive, got {latent}")
    else:
        latent = pool128_code_size(size)
        if latent_dim not in (None, latent):
            raise ValueError(f"pool128's code is its 3× pooled feature map: {latent} values at "
                             f"image size {size}, so --latent_dim={latent_dim} is impossible")
    return AutoencoderConfig(arch=arch, image_size=size, channels=preset["channels"],
                             latent_dim=latent, input_size=int(input_size), loss=preset["loss"])


def preprocess(images, config: AutoencoderConfig):
    """Turn float32 RGB ``[B, S, S, 3]`` in [0, 1] into what the network sees.

    Grey for pool128 (ITU-R 601 luma), then an antialiased resize to the
    architecture's image size when S differs (see :func:`_downscale`). Used
    by training and by the exported module alike, so both see identical pixels.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(images, dtype=tf.float32)
    if config.channels == 1:
        x = tf.image.rgb_to_grayscale(x)
    if config.input_size != config.image_size:
        x = _downscale(x, config.input_size, config.image_size)
    return x


def _downscale(x, source: int, target: int):
    """Resize ``source``-sided images to ``target`` with box averaging.

    With k = ceil(source / target), a bilinear resize to k·target (never a
    reduction, so it cannot alias) is followed by k×k average pooling: an
    exact area resize when source is a multiple of target (224 → 28), a close
    one otherwise (224 → 256 → 128). Unlike ``tf.image.resize(method="area")``
    both ops exist in TFLite, so the pipeline's TFLite engine can run the model.
    """
    import tensorflow as tf

    factor = -(-source // target)
    if factor * target != source:
        x = tf.image.resize(x, [factor * target, factor * target], method="bilinear")
    if factor > 1:
        x = tf.nn.avg_pool2d(x, factor, factor, padding="VALID")
    return x


def _conv16(config: AutoencoderConfig):
    from tensorflow import keras
    from tensorflow.keras import layers

    s, c = config.image_size, config.channels
    inputs = keras.Input((s, s, c), name="image")
    x = inputs
    for i, filters in enumerate(_CONV16_FILTERS):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"enc_conv{i}")(x)
        x = layers.LeakyReLU(0.2, name=f"enc_act{i}")(x)
        x = layers.BatchNormalization(name=f"enc_bn{i}")(x)
    volume = tuple(int(d) for d in x.shape[1:])
    x = layers.Flatten(name="enc_flatten")(x)
    latent = layers.Dense(config.latent_dim, name=LATENT_LAYER)(x)
    encoder = keras.Model(inputs, latent, name="encoder")

    code = keras.Input((config.latent_dim,), name="code")
    y = layers.Dense(int(math.prod(volume)), name="dec_dense")(code)
    y = layers.Reshape(volume, name="dec_reshape")(y)
    for i, filters in enumerate(reversed(_CONV16_FILTERS)):
        y = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", name=f"dec_deconv{i}")(y)
        y = layers.LeakyReLU(0.2, name=f"dec_act{i}")(y)
        y = layers.BatchNormalization(name=f"dec_bn{i}")(y)
    y = layers.Conv2DTranspose(c, 3, padding="same", name="dec_out")(y)
    outputs = layers.Activation("sigmoid", name="reconstruction")(y)
    decoder = keras.Model(code, outputs, name="decoder")
    return encoder, decoder


def _pool128(config: AutoencoderConfig):
    from tensorflow import keras
    from tensorflow.keras import layers

    s, c = config.image_size, config.channels
    inputs = keras.Input((s, s, c), name="image")
    x = inputs
    sides = [s]
    for i, filters in enumerate(_POOL128_FILTERS):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"enc_conv{i}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"enc_pool{i}")(x)
        sides.append(int(x.shape[1]))
    volume = tuple(int(d) for d in x.shape[1:])
    latent = layers.Flatten(name=LATENT_LAYER)(x)
    encoder = keras.Model(inputs, latent, name="encoder")

    code = keras.Input((config.latent_dim,), name="code")
    y = layers.Reshape(volume, name="dec_reshape")(code)
    # Upsample back through the encoder's sizes in reverse (e.g. 4 → 7 → 14 → 28).
    for i, (side, filters) in enumerate(zip(reversed(sides[:-1]), reversed(_POOL128_FILTERS))):
        y = layers.Resizing(side, side, interpolation="nearest", name=f"dec_up{i}")(y)
        y = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"dec_conv{i}")(y)
    logits = layers.Conv2D(c, 3, padding="same", name="logits")(y)
    decoder = keras.Model(code, logits, name="decoder")
    return encoder, decoder


def build(config: AutoencoderConfig):
    """Build ``(autoencoder, encoder)`` Keras models for a config.

    The autoencoder maps preprocessed images to reconstructions (pool128:
    logits, to be trained with sigmoid cross-entropy); the encoder shares its
    layers, so training the first trains the second.
    """
    from tensorflow import keras

    encoder, decoder = (_conv16 if config.arch == "conv16" else _pool128)(config)
    if int(encoder.output.shape[-1]) != config.latent_dim:
        raise AssertionError(f"{config.arch} encoder makes {encoder.output.shape[-1]} values, "
                             f"config says {config.latent_dim}")
    inputs = keras.Input(encoder.input.shape[1:], name="image")
    autoencoder = keras.Model(inputs, decoder(encoder(inputs)), name=f"autoencoder_{config.arch}")
    return autoencoder, encoder


def loss_for(config: AutoencoderConfig):
    """The origin's reconstruction loss: MSE on sigmoid outputs, or cross-entropy on logits."""
    from tensorflow import keras

    if config.loss == "mse":
        return keras.losses.MeanSquaredError()
    return keras.losses.BinaryCrossentropy(from_logits=True)


def reconstruct(autoencoder, images, config: AutoencoderConfig):
    """Reconstructions in [0, 1] of preprocessed images (for looking at what was learnt)."""
    import tensorflow as tf

    out = autoencoder(images, training=False)
    return tf.sigmoid(out) if config.loss == "sigmoid_cross_entropy" else out


def _hub_module(encoder, config: AutoencoderConfig):
    """Wrap the encoder and its preprocessing in a TF-Hub feature-vector ``tf.Module``."""
    import tensorflow as tf

    size = config.input_size
    image_spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="images")
    weights = [v.value for v in encoder.weights]

    class AutoencoderFeatureVector(tf.Module):
        # Reusable-SavedModel attributes, saved as plain lists so hub.KerasLayer
        # can track the weights; they shadow tf.Module's computed properties.
        variables = None
        trainable_variables = None
        regularization_losses: list | None = None

        def __init__(self) -> None:
            super().__init__(name=f"autoencoder_{config.arch}")
            self.variables = weights
            self.trainable_variables = [v.value for v in encoder.trainable_weights]
            self.regularization_losses = []

        @tf.function(input_signature=[image_spec])
        def __call__(self, images):
            return encoder(preprocess(images, config), training=False)

    module = AutoencoderFeatureVector()

    @tf.function(input_signature=[image_spec])
    def serving_default(images):
        return {"features": module(images)}

    return module, serving_default


def export_encoder(encoder, config: AutoencoderConfig, target_dir: str | os.PathLike) -> None:
    """Write the encoder as a TF-Hub style SavedModel into ``target_dir``.

    Why: ``python -m pipeline.run --model=target_dir`` then embeds a catalogue
    with the trained code, through the same ``tensorflow_hub.load`` path as
    every other model: ``obj(images [B, S, S, 3] in [0, 1]) -> [B, latent]``.
    """
    import tensorflow as tf

    module, serving = _hub_module(encoder, config)
    tf.saved_model.save(module, str(target_dir), signatures={"serving_default": serving})
