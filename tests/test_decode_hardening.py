"""Issue 15 hardening of pipeline/image_decode.py: content never leaks into error messages,
float TIFFs and HEIC decode, every unsupported format has its own reason, and the declared
size of sub-images (ICO icons, TIFF tiles, GIF frames) is checked before any pixel is decoded.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import image_decode as decode
from pipeline.image_decode import UNSUPPORTED_FORMATS, DecodeError, decode_image, float_to_uint8

tifffile = pytest.importorskip("tifffile")

SIZE = 32
ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk_live_9f8e7d6c5b4a39281706ZXQW"


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decode_error(data: bytes, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(data, SIZE, **kwargs)
    return info.value


def assert_no_fragment_of(secret: str, message: str, window: int = 6) -> None:
    """No ``window`` consecutive characters of ``secret`` appear in ``message``."""
    for i in range(len(secret) - window + 1):
        assert secret[i:i + window] not in message, (secret[i:i + window], message)


# --- content in error messages -------------------------------------------------

PEM = (f"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA{SECRET}\n"
       "-----END RSA PRIVATE KEY-----\n")
TEXT_CASES = [
    ("pem-key", PEM, "not_an_image", "PEM private key"),
    ("pem-cert", f"-----BEGIN CERTIFICATE-----\n{SECRET}\n", "not_an_image", "PEM"),
    ("json", json.dumps({"api_key": SECRET}), "not_an_image", "JSON"),
    ("html", f"<!DOCTYPE html><html><body>token={SECRET}</body></html>", "not_an_image", "HTML"),
    ("xml", f"<?xml version='1.0'?><config><key>{SECRET}</key></config>", "not_an_image", "XML"),
    ("svg", f'<svg xmlns="http://www.w3.org/2000/svg"><!-- {SECRET} --></svg>', "unsupported_svg",
     "SVG"),
    ("pdf", f"%PDF-1.7\n%{SECRET}\n", "unsupported_pdf", "PDF"),
    ("eps", f"%!PS-Adobe-3.0 EPSF-3.0\n%%Title: {SECRET}\n", "unsupported_eps", "PostScript"),
    ("script", f"#!/bin/sh\nexport TOKEN={SECRET}\n", "not_an_image", "script"),
    ("plain", f"{SECRET}\n", "not_an_image", "plain text"),
    ("env", f"AWS_SECRET_ACCESS_KEY={SECRET}\n", "not_an_image", "plain text"),
]


@pytest.mark.parametrize("name,text,reason,kind", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_file_names_its_kind_and_never_quotes_it(name, text, reason, kind):
    error = decode_error(text.encode())
    assert error.reason == reason, error.message
    assert kind in error.message
    assert_no_fragment_of(SECRET, error.message)
    assert "MIIE" not in error.message and "BEGIN" not in error.message


@pytest.mark.parametrize("prefix", [b"P6 ", b"P3\n", b"P5\n12 ", b"BM", b"II*\x00", b"MM\x00*",
                                    b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                                    b"RIFF\x00\x01\x00\x00WEBP", b"\x00\x00\x01\x00"])
def test_secret_after_an_image_signature_is_not_quoted_by_the_parser(prefix):
    # Pillow's PPM parser says "Token too long in file header: <token>"; others quote chunks.
    error = decode_error(prefix + SECRET.encode() * 3 + b"\n")
    assert_no_fragment_of(SECRET, error.message)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([b"P6 ", b"P3\n", b"P2 ", b"BM", b"II*\x00\x08\x00\x00\x00", b"GIF89a",
                        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d", b"\xff\xd8\xff", b"%PDF-", b"",
                        b"\x00\x00\x01\x00\x01\x00"]),
       st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789_-+/",
               min_size=12, max_size=60))
def test_no_error_message_copies_eight_characters_of_the_input(prefix, secret):
    try:
        decode_image(prefix + secret.encode() + b"\n" + secret.encode(), SIZE)
    except DecodeError as exc:
        assert_no_fragment_of(secret, exc.message, window=8)


def test_safe_detail_keeps_the_decoders_words_and_drops_the_files():
    data = b"P6 " + SECRET.encode()
    detail = decode._safe_detail(ValueError(f"Token too long in file header: {SECRET[:10]}"), data)
    assert detail == "ValueError: Token too long in file header: …"
    assert decode._safe_detail(SyntaxError("broken PNG file (chunk b'IHDR')"), data) == \
        "SyntaxError: broken PNG file (chunk …)"


# --- float TIFFs ------------------------------------------------------------------

def float_tiff(arr: np.ndarray, alpha: bool = False, **kwargs) -> bytes:
    buf = io.BytesIO()
    if alpha:
        kwargs["extrasamples"] = ["unassalpha"]
    if arr.ndim == 3:
        kwargs["photometric"] = "minisblack" if arr.shape[2] == 2 else "rgb"
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def gradient(dtype, channels: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """A 16×32 horizontal gradient from ``lo`` to ``hi`` in every colour channel."""
    row = np.linspace(lo, hi, 32, dtype=np.float64)
    arr = np.tile(row, (16, 1))
    return np.repeat(arr[:, :, None], channels, axis=2).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("channels,alpha", [(1, False), (3, False), (2, True), (4, True)],
                         ids=["grey", "rgb", "grey-alpha", "rgba"])
def test_float_tiff_decodes_to_its_gradient(dtype, channels, alpha):
    arr = gradient(dtype, channels)
    if alpha:
        arr[..., -1] = 1.0  # opaque
    data = float_tiff(arr if channels > 1 else arr[..., 0], alpha=alpha)
    result = decode_image(data, SIZE)
    assert (result.width, result.height) == (32, 16)
    row = result.pixels[16, :, 0].astype(int)  # the picture is rows 8..23
    assert row[0] <= 2 and row[-1] >= 253
    assert np.all(np.diff(row) >= 0)
    assert 115 <= row[16] <= 140
    assert (result.pixels[16, :, 0] == result.pixels[16, :, 2]).all()


def test_float_rgb_tiff_keeps_its_colours_and_compression_is_decoded():
    arr = np.zeros((16, 16, 3), np.float32)
    arr[:, :8] = (1.0, 0.0, 0.0)
    arr[:, 8:] = (0.0, 0.0, 1.0)
    result = decode_image(float_tiff(arr, compression="zlib"), SIZE)
    assert tuple(result.pixels[16, 4]) == (255, 0, 0)
    assert tuple(result.pixels[16, 28]) == (0, 0, 255)


def test_float_alpha_composites_on_white():
    arr = np.zeros((16, 16, 4), np.float32)  # black
    arr[:, :8, 3] = 0.0  # transparent left
    arr[:, 8:, 3] = 1.0
    result = decode_image(float_tiff(arr, alpha=True), SIZE)
    assert tuple(result.pixels[16, 4]) == (255, 255, 255)
    assert tuple(result.pixels[16, 28]) == (0, 0, 0)


@pytest.mark.parametrize("lo,hi,mid", [
    (-0.05, 1.05, (115, 140)),   # overshoot of a nominal 0..1 image is clipped
    (0.0, 255.0, (115, 140)),    # floats stored from 8-bit data
    (0.0, 40.0, (115, 140)),     # HDR radiance: stretched, not all white
    (-3.0, 3.0, (115, 140)),     # signed data: stretched
    (0.0, 60000.0, (115, 140)),  # 16-bit data stored as float
])
@pytest.mark.parametrize("channels", [1, 3])
def test_float_tiff_outside_unit_range_still_gives_a_visible_gradient(lo, hi, mid, channels):
    arr = gradient(np.float32, channels, lo, hi)
    result = decode_image(float_tiff(arr if channels > 1 else arr[..., 0]), SIZE)
    row = result.pixels[16, :, 0].astype(int)
    assert row[0] <= 14 and row[-1] >= 241
    assert np.all(np.diff(row) >= 0)
    assert mid[0] <= row[16] <= mid[1]


def test_float_nan_and_infinity_do_not_break_the_mapping():
    arr = np.array([[np.nan, -np.inf, 0.0, 0.5, 1.0, np.inf]], np.float32)
    assert float_to_uint8(arr).tolist() == [[0, 0, 0, 128, 255, 255]]


def test_float_tiff_over_the_pixel_limit_is_refused_before_decoding():
    data = float_tiff(np.zeros((100, 100, 3), np.float32))
    assert decode_error(data, max_pixels=9_999).reason == "too_many_pixels"


def test_non_float_tiff_pillow_cannot_read_keeps_its_own_error():
    arr = np.zeros((8, 8, 3), np.int8)  # signed RGB: no Pillow mode, and not float
    error = decode_error(float_tiff(arr))
    assert error.reason == "corrupt" and "TIFF" in error.message


# --- HEIC ---------------------------------------------------------------------

def heic_bytes() -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    return encode(Image.fromarray(arr), "HEIF", quality=95)


def test_heic_decodes_when_pillow_heif_is_installed():
    data = heic_bytes()
    assert data[4:12] == b"ftypheic"
    result = decode_image(data, SIZE)
    assert (result.width, result.height) == (40, 20)
    r, g, b = (int(v) for v in result.pixels[16, 6])
    assert r > 200 and g < 50 and b < 50
    r, g, b = (int(v) for v in result.pixels[16, 26])
    assert b > 200 and r < 50 and g < 50


def test_heic_without_a_decoder_gets_its_own_reason(monkeypatch):
    data = heic_bytes()
    monkeypatch.setattr(decode, "ALLOWED_FORMATS",
                        tuple(f for f in decode.ALLOWED_FORMATS if f != "HEIF"))
    error = decode_error(data)
    assert error.reason == "unsupported_heic" and "pillow-heif" in error.message


def test_broken_heic_with_a_decoder_is_corrupt_not_unsupported():
    data = heic_bytes()
    error = decode_error(data[:40] + b"\x00" * 200)
    assert error.reason in ("corrupt", "truncated") and "HEIF" in error.message


def test_heic_over_the_pixel_limit_is_refused():
    assert decode_error(heic_bytes(), max_pixels=799).reason == "too_many_pixels"


def test_avif_is_still_decoded_and_not_taken_for_heic():
    data = encode(Image.new("RGB", (16, 16), (0, 255, 0)), "AVIF", quality=95)
    pixel = decode_image(data, SIZE).pixels[16, 16]
    assert pixel[1] > 200 and pixel[0] < 60 and pixel[2] < 60


# --- every unsupported format has its own reason -------------------------------

def _ftyp(brand: bytes, *compatible: bytes) -> bytes:
    body = brand + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00" * 64


UNSUPPORTED_SAMPLES = {
    "unsupported_svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
    "unsupported_pdf": lambda: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n",
    "unsupported_eps": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n",
    "unsupported_heic": lambda: _ftyp(b"mif1", b"mif1", b"heic"),
    "unsupported_jpeg2000": lambda: encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG2000"),
    "unsupported_jpeg_xl": lambda: b"\xff\x0a\xfa\x7f\x01\x90\x08" + b"\x00" * 32,
    "unsupported_psd": lambda: b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3),
    "unsupported_icns": lambda: b"icns" + struct.pack(">I", 8),
    "unsupported_qoi": lambda: encode(Image.new("RGB", (16, 16), (9, 9, 9)), "QOI"),
    "unsupported_dds": lambda: encode(Image.new("RGB", (16, 16), (9, 9, 9)), "DDS"),
    "unsupported_xcf": lambda: b"gimp xcf v011\x00" + b"\x00" * 32,
    "unsupported_wmf": lambda: b"\xd7\xcd\xc6\x9a" + b"\x00" * 40,
    "unsupported_video": lambda: _ftyp(b"isom", b"isom", b"mp41"),
}


def test_every_unsupported_reason_has_a_sample():
    assert set(UNSUPPORTED_SAMPLES) == set(UNSUPPORTED_FORMATS)


@pytest.mark.parametrize("reason", sorted(UNSUPPORTED_SAMPLES))
def test_unsupported_format_gets_its_own_reason(reason, monkeypatch):
    # As on an installation without pillow-heif, so HEIC is one of the unsupported formats.
    monkeypatch.setattr(decode, "ALLOWED_FORMATS",
                        tuple(f for f in decode.ALLOWED_FORMATS if f != "HEIF"))
    error = decode_error(UNSUPPORTED_SAMPLES[reason]())
    assert error.reason == reason, error.message
    assert error.message.startswith("not a supported image")


# --- declared sub-image sizes are checked before decoding ----------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def big_png(width: int, height: int) -> bytes:
    """A small file holding a real, all-zero ``width``×``height`` RGBA PNG."""
    raw = zlib.compress(b"\x00" * ((width * 4 + 1) * height), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", raw)
            + png_chunk(b"IEND", b""))


def ico_holding(image: bytes, bpp: int = 32) -> bytes:
    """An ICO whose one directory entry says 256×256 but points to ``image``."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, bpp, len(image), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + image


def big_dib(width: int, height: int) -> bytes:
    """A 32-bit ICO bitmap (XOR + AND masks) of ``width``×``height``, stored in full."""
    header = struct.pack("<IiiHHIIiiII", 40, width, height * 2, 1, 32, 0, 0, 0, 0, 0, 0)
    return header + b"\x00" * (width * height * 4 + ((width + 31) // 32 * 4) * height)


def tiled_tiff(tile: int) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16, 3), np.uint8), tile=(tile, tile), compression="zlib",
                     photometric="rgb")
    return buf.getvalue()


def gif_with_big_first_frame(width: int, height: int) -> bytes:
    """A GIF whose screen is 4×4 but whose first frame descriptor is ``width``×``height``."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + descriptor + b"\x02\x02\x44\x01\x00;"


BOMBS = {
    "ico-png": lambda: ico_holding(big_png(3000, 3000)),
    "ico-bmp": lambda: ico_holding(big_dib(3000, 3000)),
    "tiff-tile": lambda: tiled_tiff(4096),
    "gif-frame": lambda: gif_with_big_first_frame(3000, 3000),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_sub_image_over_the_limit_is_too_many_pixels(name):
    error = decode_error(BOMBS[name](), max_pixels=1_000_000)
    assert error.reason == "too_many_pixels", error.message


def test_small_real_ico_and_tiled_tiff_still_decode():
    ico = encode(Image.new("RGBA", (32, 32), (255, 0, 0, 255)), "ICO", sizes=[(32, 32), (16, 16)])
    assert tuple(decode_image(ico, SIZE).pixels[16, 16]) == (255, 0, 0)
    assert decode_image(tiled_tiff(16), SIZE).width == 16
    assert decode_image(ico_holding(big_png(300, 300)), SIZE).width == 300  # the real icon size


_MEASURE = """
import os, sys
sys.path.insert(0, sys.argv[1])


def peak_kib():
    # VmHWM is this address space's peak RSS; ru_maxrss would carry the parent's peak
    # over execve on Linux and hide the growth.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


from pipeline import image_decode as decode
if sys.argv[4] == "unguarded":
    decode._ico_icon_sizes = lambda data: iter(())
fd = os.open(sys.argv[2], os.O_RDONLY)
data = os.read(fd, os.fstat(fd).st_size)  # one exact buffer, no read-ahead copy in the peak
os.close(fd)
before = peak_kib()
try:
    decode.decode_image(data, 32, max_pixels=int(sys.argv[3]))
    reason = "decoded"
except decode.DecodeError as exc:
    reason = exc.reason
after = peak_kib()
print(reason, (after - before) // 1024)
"""


def peak_rss_growth_mib(tmp_path, data: bytes, guarded: bool = True) -> tuple[str, int]:
    """Decode ``data`` in a fresh interpreter; its reason and peak RSS growth in MiB."""
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ROOT), str(path), "1000000",
         "guarded" if guarded else "unguarded"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert out.returncode == 0, out.stderr
    reason, growth = out.stdout.split()
    return reason, int(growth)


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_sub_image_bomb_is_refused_with_little_memory(tmp_path, name):
    reason, growth = peak_rss_growth_mib(tmp_path, BOMBS[name]())
    assert reason == "too_many_pixels"
    assert growth < 8, f"peak RSS grew by {growth} MiB while refusing {name}"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_memory_check_would_catch_an_unguarded_ico(tmp_path):
    # The same measurement without the ICO check: Pillow's open() decodes the 9-megapixel BMP
    # icon (the later size check still refuses it, but only after the memory was spent).
    reason, growth = peak_rss_growth_mib(tmp_path, BOMBS["ico-bmp"](), guarded=False)
    assert reason == "too_many_pixels" and growth > 40
