"""Decode image bytes into a fixed-size RGB array the model can embed.

Catalogue images arrive in every format, colour mode and size a shop ever
uploaded, and some are not images at all (an HTML error page, a truncated
download). :func:`decode_image` turns any bytes into either a letterboxed
``size``×``size``×3 ``uint8`` array or a :class:`DecodeError` whose reason a
person can act on; :class:`DecodeImageFn` does that for each pipeline row and
sends failures to the dead-letter output.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo straight to numpy; Pillow decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - a requirement, but decoding must not depend on it
    simplejpeg = None

from transforms.errors import (ERRORS, METRICS_NAMESPACE, STAGE_DECODE, RowError, count_failure,
                              error_record)

# A cut-off download must be reported, never silently decoded with a grey
# bottom half, so truncated files always raise in this process.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats identified by their content (magic bytes); JPEG includes MPO
# multi-picture files from cameras. Formats Pillow can only guess
# heuristically (TGA) or that run external programs (EPS) are left out, so
# random bytes are never "decoded" into a garbage picture.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO", "PPM")

DEFAULT_MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)

# Orientations (EXIF tag 0x0112) that swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)

_SRGB_PROFILE = ImageCms.createProfile("sRGB")


class DecodeError(RowError):
    """Bytes that cannot be turned into pixels; ``reason`` says why.

    Reasons: ``empty``, ``not_an_image``, ``too_many_pixels``, ``truncated``,
    ``unsupported_mode`` and ``corrupt``.
    """


@dataclass
class DecodedImage:
    """Letterboxed pixels plus the original size of the picture.

    ``pixels`` is ``uint8`` with shape ``(size, size, 3)``; ``width`` and
    ``height`` are the source dimensions after EXIF orientation, kept so the
    output can report what the shop actually uploaded.
    """

    pixels: np.ndarray
    width: int
    height: int


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` into a white-letterboxed ``size``×``size`` RGB image.

    The format is identified from the content, never from a file name. The
    pixel count is checked before any pixel is decoded, so a decompression
    bomb costs nothing. Raises :class:`DecodeError` and nothing else, so one
    bad file can never take a pipeline worker down.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not data:
        raise DecodeError("empty", "the image file is empty (0 bytes)")
    try:
        img = _open(data, max_pixels)
        orientation = _orientation(img)
        width, height = img.size
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        fast = _fast_jpeg_pixels(img, data, orientation, size)
        if fast is not None:
            return DecodedImage(pixels=fast, width=width, height=height)
        if img.format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result
            # stays at least ``size`` on its shorter side: big photos get much
            # cheaper and the final resize still only shrinks.
            img.draft("RGB", (size, size))
        img.load()
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        pixels = letterbox(rgb, size)
    except DecodeError:
        raise
    except Exception as exc:  # Pillow plugins raise many types on bad input.
        raise _classify(exc, data) from exc
    return DecodedImage(pixels=pixels, width=width, height=height)


def _draft_scale(width: int, height: int, size: int) -> int:
    """The 1/s scale Pillow's JPEG ``draft`` picks: the largest power of two that
    keeps both sides at least ``size``."""
    fits = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def _fast_jpeg_pixels(img: Image.Image, data: bytes, orientation, size: int):
    """Letterboxed pixels of a plain JPEG decoded by libjpeg-turbo directly, or None.

    simplejpeg decodes straight into an RGB array, about twice as fast as
    Pillow for catalogue-sized photos, with the same pixels (same library,
    same accurate DCT and upsampling, same 1/s scale as ``draft``). Anything
    less plain — CMYK, EXIF rotation, MPO, a stream libjpeg complains about —
    returns None and takes the Pillow path, which also names the problem.
    """
    if (simplejpeg is None or img.format != "JPEG" or img.mode not in ("RGB", "L")
            or orientation not in (None, 1)):
        return None
    scale = _draft_scale(img.width, img.height, size)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=False, fastupsample=False,
            min_width=-(-img.width // scale), min_height=-(-img.height // scale))
    except ValueError:
        return None
    if pixels.shape[:2] == (size, size):
        return pixels
    return letterbox(Image.fromarray(pixels, mode="RGB"), size)


def letterbox(img: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image so its longer side is ``size`` and centre it on white.

    Keeping the aspect ratio keeps product shapes undistorted; white padding
    matches the white studio background most product photos already have.
    """
    w, h = img.size
    scale = size / max(w, h)
    new_w = min(size, max(1, round(w * scale)))
    new_h = min(size, max(1, round(h * scale)))
    if (new_w, new_h) != (w, h):
        # reducing_gap first box-reduces by an integer factor (fast), then the
        # bilinear pass stays close to a full-quality antialiased resize.
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if (new_w, new_h) == (size, size):
        return np.array(img, dtype=np.uint8)
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return np.array(canvas, dtype=np.uint8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image by content and refuse oversized ones before decoding."""
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", f"the image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"the image is {img.width}×{img.height} = {pixels:,} pixels, more than the "
            f"limit of {max_pixels:,}; it may be a decompression bomb, or raise max_pixels",
        )
    if pixels == 0:
        raise DecodeError("corrupt", f"the {img.format} header says the image is {img.width}×{img.height}")
    return img


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation (1-8) the camera recorded, or None if there is none."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # A broken EXIF block is ignored, like a missing one.
        return None
    return orientation if orientation in range(1, 9) else None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
        mode = img.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise DecodeError("unsupported_mode", f"cannot convert {img.format} colour mode {mode!r} to RGB") from exc


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits over the full range.

    Pillow's own conversion clips 16-bit values at 255, which turns almost any
    16-bit picture white; here 0..65535 maps linearly onto 0..255. Float
    images are taken as 0..1 when they fit in it, else as 0..255.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        out = np.clip(np.rint(arr), 0, 255)
    else:
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        out = (wide * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Convert CMYK to RGB through the embedded ICC profile when there is one.

    Print-oriented CMYK files look badly off with a naive conversion when they
    carry a real profile; without one, Pillow's formula is the best guess.
    """
    icc = img.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, source, _SRGB_PROFILE, outputMode="RGB")
        except Exception:  # A broken profile falls back to the formula.
            pass
    return img.convert("RGB")


_TRUNCATION_HINTS = ("truncated", "broken data stream", "unexpected end", "premature end")


def _classify(exc: BaseException, data: bytes) -> DecodeError:
    """Turn any exception Pillow raised into a DecodeError with a clear reason."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, Image.DecompressionBombError):
        return DecodeError("too_many_pixels", f"the image is too large to decode safely: {text}")
    if any(hint in lowered for hint in _TRUNCATION_HINTS) or _riff_truncated(data):
        return DecodeError("truncated", f"the image file is truncated (incomplete download or upload?): {text}")
    if isinstance(exc, MemoryError):
        return DecodeError("corrupt", "ran out of memory decoding the image; its header is probably corrupt")
    return DecodeError("corrupt", f"the image data is corrupt and could not be decoded ({type(exc).__name__}: {text})")


def _riff_truncated(data: bytes) -> bool:
    """True when a RIFF (WebP) file is shorter than its header says it is.

    libwebp only says "could not create decoder object" for a cut-off file;
    the RIFF length field tells a truncated download apart from corruption.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return len(data) < int.from_bytes(data[4:8], "little") + 8


# Leading bytes of the formats in ALLOWED_FORMATS, to tell a damaged image
# header ("corrupt") apart from content that never was an image.
_SIGNATURES = (
    (b"\xff\xd8", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _signature_format(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    return None


def _unidentified(data: bytes) -> DecodeError:
    """Explain bytes Pillow could not identify: a damaged image or no image."""
    fmt = _signature_format(data)
    if fmt is None:
        return DecodeError("not_an_image", _not_an_image_message(data))
    if fmt not in Image.OPEN:
        Image.init()
    try:  # Re-run the format's parser alone, only to learn what is wrong.
        Image.OPEN[fmt][0](io.BytesIO(data), None)
        detail = "unknown header error"
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
    lowered = detail.lower()
    if any(hint in lowered for hint in _TRUNCATION_HINTS + ("requires a buffer",)) or _riff_truncated(data):
        return DecodeError(
            "truncated",
            f"the file starts like a {fmt} image but ends inside its header ({len(data)} bytes; {detail})",
        )
    return DecodeError("corrupt", f"the file starts like a {fmt} image but its header is damaged ({detail})")


def _not_an_image_message(data: bytes) -> str:
    """Say what the bytes look like, so a person knows where to look."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "not an image Pillow can read: the content is an SVG (vector) file; only raster images are supported"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return (
            "not an image: the content is an HTML page (often an error or login page "
            "served instead of the image)"
        )
    if head.startswith((b"{", b"[")):
        return "not an image: the content looks like JSON text"
    sample = data[:512]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "not an image: the content is plain text (not quoted here: it may be a secret)"
    return (
        "not an image: the content is not in a supported image format "
        f"({', '.join(ALLOWED_FORMATS)})"
    )


class DecodeImageFn(beam.DoFn):
    """Replace each row's ``data`` bytes by ``pixels``, ``width`` and ``height``.

    Rows whose bytes cannot be decoded go to the ``ERRORS`` output as one
    dead-letter record each; the rest of the row is carried unchanged.
    """

    def __init__(self, size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self._size = size
        self._max_pixels = max_pixels
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "decoded")

    def process(self, row: dict) -> Iterator:
        """Decode one row; emit it on the main output or its error on ERRORS."""
        try:
            decoded = decode_image(row.get("data") or b"", self._size, self._max_pixels)
        except DecodeError as exc:
            count_failure(STAGE_DECODE, exc.reason)
            yield pvalue.TaggedOutput(ERRORS, error_record(row, STAGE_DECODE, exc.reason, exc.message))
            return
        self._decoded.inc()
        out = {k: v for k, v in row.items() if k != "data"}
        out["pixels"] = decoded.pixels
        out["width"] = decoded.width
        out["height"] = decoded.height
        yield out
