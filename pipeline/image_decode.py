"""Decode image bytes into a fixed-size RGB array the model can embed.

Catalogue images arrive in every format, colour mode and size a shop ever
uploaded, and some are not images at all (an HTML error page, a truncated
download). :func:`decode_image` turns any bytes into either a letterboxed
``size``×``size``×3 ``uint8`` array or a :class:`DecodeError` whose reason a
person can act on. A plain module (no Beam): the pipeline's
``transforms.decode.DecodeImageFn``, the query API and the report all decode with it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo straight to numpy; Pillow decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - a requirement, but decoding must not depend on it
    simplejpeg = None

try:  # float TIFFs (RGB, float16) that Pillow has no mode for
    import tifffile
except ImportError:  # pragma: no cover - a requirement; such TIFFs then get their own reason
    tifffile = None

try:  # HEIC/HEIF (phone photos); optional because its binary wheels are GPLv2 (bundled x265)
    import pillow_heif
except ImportError:
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

from pipeline.row_errors import RowError

# A cut-off download must be reported, never silently decoded with a grey
# bottom half, so truncated files always raise in this process.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats identified by their content (magic bytes); JPEG includes MPO
# multi-picture files from cameras. Formats Pillow can only guess
# heuristically (TGA) or that run external programs (EPS) are left out, so
# random bytes are never "decoded" into a garbage picture.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO", "PPM") + (
    ("HEIF",) if pillow_heif is not None else ())

DEFAULT_MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)

# Orientations (EXIF tag 0x0112) that swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)

_SRGB_PROFILE = ImageCms.createProfile("sRGB")


class DecodeError(RowError):
    """Bytes that cannot be turned into pixels; ``reason`` says why.

    Reasons: ``empty``, ``not_an_image``, ``too_many_pixels``, ``truncated``,
    ``unsupported_mode``, ``corrupt`` and one ``unsupported_<format>`` per
    recognised format that is not decoded (``unsupported_svg``,
    ``unsupported_pdf``, ``unsupported_heic``…, see ``UNSUPPORTED_FORMATS``).
    Messages name the kind of content but never copy any of its bytes.
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
    for what, width, height in _ico_icon_sizes(data):  # Pillow decodes an ICO inside open()
        _check_pixels(width, height, max_pixels, what)
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels",
                          f"the image is too large to decode safely: {_safe_detail(exc, data)}") from exc
    except UnidentifiedImageError as exc:
        if _signature_format(data) == "TIFF":
            float_tiff = _float_tiff(data, max_pixels)
            if float_tiff is not None:
                return float_tiff
        raise _unidentified(data) from exc
    _check_pixels(img.width, img.height, max_pixels, "the image")
    if img.width * img.height == 0:
        raise DecodeError("corrupt", f"the {img.format} header says the image is {img.width}×{img.height}")
    for what, width, height in _sub_images(img, data):
        _check_pixels(width, height, max_pixels, what)
    return img


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise ``too_many_pixels`` when a declared ``width``×``height`` is over the limit."""
    pixels = width * height
    if pixels > max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"{what} is {width}×{height} = {pixels:,} pixels, more than the "
            f"limit of {max_pixels:,}; it may be a decompression bomb, or raise max_pixels",
        )


def _ico_icon_sizes(data: bytes) -> Iterator[tuple[str, int, int]]:
    """Declared sizes of every icon in an ICO/CUR file, read from the raw bytes.

    The directory claims at most 256×256 per icon, but each entry points to a
    PNG or BMP carrying its own size, and Pillow decodes the first one inside
    ``Image.open`` (a 3000×3000 BMP icon costs ~40 MB before any guard runs),
    so every entry's embedded header is read here, before Pillow sees the file.
    """
    if len(data) < 6 or data[:4] not in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return
    kind = "ICO" if data[2] == 1 else "CUR"
    count = int.from_bytes(data[4:6], "little")
    for n in range(count):
        entry = data[6 + 16 * n:22 + 16 * n]
        if len(entry) < 16:
            return  # a cut directory is Pillow's to report
        size = _embedded_icon_size(data, int.from_bytes(entry[12:16], "little"))
        if size is not None:
            yield f"icon {n + 1} of the {kind} file", size[0], size[1]


def _sub_images(img: Image.Image, data: bytes) -> Iterator[tuple[str, int, int]]:
    """Declared sizes of the parts decoding allocates beyond ``img.size``, read from headers.

    A tiled TIFF makes libtiff allocate one whole tile per read, whatever the
    image size. (ICO icons are checked before ``Image.open``; GIF and APNG
    frames and MPO pictures after the first are never decoded, and Pillow
    folds a first GIF frame bigger than the screen into ``img.size``.)
    """
    if img.format == "TIFF":
        tag = getattr(img, "tag_v2", {})
        tile_w, tile_h = tag.get(322), tag.get(323)  # TileWidth, TileLength
        if isinstance(tile_w, int) and isinstance(tile_h, int):
            yield "a tile of the TIFF file", tile_w, tile_h


def _embedded_icon_size(data: bytes, offset: int) -> tuple[int, int] | None:
    """Width and height an ICO entry's embedded PNG (IHDR) or BMP (DIB header) declares."""
    head = data[offset:offset + 24]
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if len(head) >= 12:
        width = abs(int.from_bytes(head[4:8], "little", signed=True))
        height = abs(int.from_bytes(head[8:12], "little", signed=True)) // 2  # XOR + AND masks
        return width, height
    return None


# TIFF SampleFormat (tag 339) 3 is IEEE float.
_TIFF_FLOAT = 3


def _float_tiff(data: bytes, max_pixels: int) -> Image.Image | None:
    """Decode a float TIFF Pillow has no mode for (RGB, RGBA, float16…) into 8-bit RGB(A)/L(A).

    Returns None for any TIFF that is not a float image, so its own error
    stands. The pixel guard runs on the first page's header before decoding.
    """
    if tifffile is None:
        return None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            if page.sampleformat != _TIFF_FLOAT:
                return None
            _check_pixels(page.imagewidth, page.imagelength, max_pixels, "the image")
            if page.is_tiled:
                _check_pixels(page.tilewidth, page.tilelength, max_pixels, "a tile of the TIFF file")
            try:
                arr = page.asarray()
            except (KeyError, ValueError) as exc:
                if "imagecodecs" not in str(exc):
                    raise
                raise DecodeError(
                    "unsupported_tiff_compression",
                    f"the float TIFF uses {page.compression.name} compression, which this "
                    "installation cannot decode for float pixels (tifffile needs imagecodecs)",
                ) from exc
            extra = len(page.extrasamples)
    except DecodeError:
        raise
    except Exception as exc:  # tifffile raises many types on bad input
        raise _classify(exc, data) from exc
    return _float_array_to_image(arr, has_alpha=extra > 0)


def _float_array_to_image(arr: np.ndarray, has_alpha: bool) -> Image.Image:
    """8-bit L, LA, RGB or RGBA image from a float (H, W[, C]) array."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DecodeError("unsupported_mode", f"cannot convert a float TIFF of shape {arr.shape} to RGB")
    channels = arr.shape[2]
    colour = channels - 1 if has_alpha and channels in (2, 4) else channels
    if colour not in (1, 3):
        colour = 3 if channels >= 3 else 1
    out = np.empty(arr.shape[:2] + (colour + (1 if has_alpha else 0),), dtype=np.uint8)
    out[..., :colour] = float_to_uint8(arr[..., :colour])
    if has_alpha:
        out[..., colour] = float_to_uint8(arr[..., colour])
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[out.shape[2]]
    return Image.fromarray(out if out.shape[2] > 1 else out[..., 0], mode=mode)


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map float samples to 0..255 by the range they are evidently stored in.

    Float images nominally hold 0..1, and slight over- and undershoot from
    processing is clipped (values within -1..2). Non-negative floats whose
    maximum is over 64 and at most 255 were stored from 8-bit data and are
    taken as is. Anything else (HDR radiance, signed or 16-bit-scaled data) is
    stretched from its own minimum to maximum so the picture stays visible.
    NaN becomes the low end, infinities the ends.
    """
    arr = np.asarray(arr, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= -1.0 and hi <= 2.0:
        lo, hi = 0.0, 1.0
    elif lo >= 0.0 and 64.0 < hi <= 255.0:
        lo, hi = 0.0, 255.0
    elif hi == lo:
        hi = lo + 1.0
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


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
    images follow :func:`float_to_uint8`.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        out = float_to_uint8(arr)
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

# A Python bytes or str literal inside an exception message (Pillow quotes chunk
# names, tokens and header fields it read from the file this way).
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')
_WORD = re.compile(r"[^\s:;,()\[\]{}<>=]{4,}")


def _safe_detail(exc: BaseException, data: bytes) -> str:
    """``Type: message`` of a parser's exception with every piece of the file's content removed.

    Decoders quote what they read ("Token too long in file header: <token>",
    "broken PNG file (chunk b'...')"), and what they read may be a secret a
    text file started with. Quoted literals are dropped and any word of four
    or more characters that occurs in ``data`` is replaced by ``…``, so the
    sentence keeps the decoder's own words and none of the input's.
    """
    text = _QUOTED.sub("…", str(exc))

    def redact(match: re.Match) -> str:
        word = match.group(0)
        return "…" if word.encode("utf-8", "replace") in data else word

    text = _WORD.sub(redact, text)
    text = text if len(text) <= 160 else text[:157] + "…"
    return f"{type(exc).__name__}: {text}" if text.strip() else type(exc).__name__


def _classify(exc: BaseException, data: bytes) -> DecodeError:
    """Turn any exception Pillow raised into a DecodeError with a clear reason."""
    if isinstance(exc, DecodeError):
        return exc
    lowered = (str(exc) or type(exc).__name__).lower()
    detail = _safe_detail(exc, data)
    if isinstance(exc, Image.DecompressionBombError):
        return DecodeError("too_many_pixels", f"the image is too large to decode safely: {detail}")
    if any(hint in lowered for hint in _TRUNCATION_HINTS) or _riff_truncated(data):
        return DecodeError("truncated", f"the image file is truncated (incomplete download or upload?): {detail}")
    if isinstance(exc, MemoryError):
        return DecodeError("corrupt", "ran out of memory decoding the image; its header is probably corrupt")
    return DecodeError("corrupt", f"the image data is corrupt and could not be decoded ({detail})")


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
    if "HEIF" in ALLOWED_FORMATS and _ftyp_brands(data) & _HEIF_BRANDS and not (
            _ftyp_brands(data) & _AVIF_BRANDS):
        return "HEIF"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    return None


# ISO base media (HEIF family) brands, read from the ``ftyp`` box.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                b"mif1", b"msf1", b"mif2"}
_AVIF_BRANDS = {b"avif", b"avis"}

# reason code -> what a person reads. Every recognised format that is not decoded has
# its own code, so a shop can count and convert exactly those uploads.
UNSUPPORTED_FORMATS = {
    "unsupported_svg": "an SVG (vector) drawing; only raster images are supported",
    "unsupported_pdf": "a PDF document",
    "unsupported_eps": "PostScript/EPS (vector); only raster images are supported",
    "unsupported_heic": ("a HEIC/HEIF photo, and no HEIF decoder is installed here "
                         "(pip install pillow-heif to decode them)"),
    "unsupported_jpeg2000": "a JPEG 2000 image, which is not decoded",
    "unsupported_jpeg_xl": "a JPEG XL image, which is not decoded",
    "unsupported_psd": "a Photoshop (PSD) document, which is not decoded",
    "unsupported_icns": "a macOS icon set (ICNS), which is not decoded",
    "unsupported_qoi": "a QOI image, which is not decoded",
    "unsupported_dds": "a DirectDraw Surface (DDS) texture, which is not decoded",
    "unsupported_xcf": "a GIMP (XCF) document, which is not decoded",
    "unsupported_wmf": "a Windows metafile (WMF/EMF, vector), which is not decoded",
    "unsupported_video": "a video (ISO media), not a still image",
}


def _ftyp_brands(data: bytes) -> set[bytes]:
    """Major and compatible brands of an ISO base media file's leading ``ftyp`` box."""
    if data[4:8] != b"ftyp":
        return set()
    box = int.from_bytes(data[:4], "big")
    return {data[i:i + 4] for i in range(8, min(max(box, 16), 64), 4)} - {b"\x00\x00\x00\x00"}


def _unsupported_format(data: bytes, head: bytes) -> str | None:
    """The ``unsupported_<format>`` reason of a recognised image format that is not decoded."""
    if data[4:8] == b"ftyp":
        brands = _ftyp_brands(data)
        if brands & _AVIF_BRANDS:
            return None  # AVIF is decoded; a damaged one is reported as corrupt by Pillow
        if brands & _HEIF_BRANDS:
            return "unsupported_heic"
        return "unsupported_video"
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "unsupported_jpeg2000"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "unsupported_jpeg_xl"
    if data.startswith(b"%PDF-"):
        return "unsupported_pdf"
    if data.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "unsupported_eps"
    if data.startswith(b"8BPS"):
        return "unsupported_psd"
    if data.startswith(b"icns"):
        return "unsupported_icns"
    if data.startswith(b"qoif"):
        return "unsupported_qoi"
    if data.startswith(b"DDS "):
        return "unsupported_dds"
    if data.startswith(b"gimp xcf"):
        return "unsupported_xcf"
    if data.startswith((b"\xd7\xcd\xc6\x9a", b"\x01\x00\x09\x00")) or data[40:44] == b" EMF":
        return "unsupported_wmf"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "unsupported_svg"
    return None


def _unidentified(data: bytes) -> DecodeError:
    """Explain bytes Pillow could not identify: a damaged image, an unsupported format or no image."""
    fmt = _signature_format(data)
    if fmt is None:
        head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        reason = _unsupported_format(data, head)
        if reason is not None:
            return DecodeError(reason, f"not a supported image: the content is {UNSUPPORTED_FORMATS[reason]}")
        return DecodeError("not_an_image", f"not an image: the content {_content_kind(data, head)}")
    if fmt not in Image.OPEN:
        Image.init()
    try:  # Re-run the format's parser alone, only to learn what is wrong.
        Image.OPEN[fmt][0](io.BytesIO(data), None)
        detail = "unknown header error"
        lowered = ""
    except Exception as exc:
        detail = _safe_detail(exc, data)
        lowered = str(exc).lower()
    if any(hint in lowered for hint in _TRUNCATION_HINTS + ("requires a buffer",)) or _riff_truncated(data):
        return DecodeError(
            "truncated",
            f"the file starts like a {fmt} image but ends inside its header ({len(data)} bytes; {detail})",
        )
    return DecodeError("corrupt", f"the file starts like a {fmt} image but its header is damaged ({detail})")


def _content_kind(data: bytes, head: bytes) -> str:
    """Name what non-image bytes look like, without quoting any of them.

    The first bytes of a file can be a secret (a private key pasted where an
    image belongs), so this says only which kind of content it is.
    """
    if head.startswith(b"-----begin "):
        if b"private key" in head[:64]:
            return "looks like a PEM private key (text); it is not quoted here"
        return "looks like PEM text (a key or certificate)"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "looks like an HTML page (often an error or login page served instead of the image)"
    if head.startswith(b"<?xml") or head.startswith(b"<"):
        return "looks like XML or markup text"
    if head.startswith((b"{", b"[")):
        return "looks like JSON text"
    if data.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "looks like a compressed archive (ZIP, gzip, 7z or RAR)"
    if head.startswith(b"#!"):
        return "looks like a script (text)"
    try:
        text = data[:512].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "looks like plain text"
    return f"is binary data in no supported image format ({', '.join(ALLOWED_FORMATS)})"
