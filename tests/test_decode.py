"""Tests of pipeline/image_decode.py and its DoFn (transforms/decode.py): every input becomes pixels or one clear error."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import timedelta

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from pipeline.image_decode import DecodedImage, DecodeError, decode_image
from pipeline.records import FetchedRow
from transforms.decode import DecodeImageFn
from transforms.errors import ERRORS

SIZE = 32
RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Save ``img`` in ``fmt`` and return the file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def two_halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = left
    arr[:, width // 2 :] = right
    return Image.fromarray(arr)


def close(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def assert_decode_error(data: bytes, reason: str, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(data, SIZE, **kwargs)
    assert info.value.reason == reason, info.value.message
    assert info.value.message
    return info.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def tiny_png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width×height: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


# --- good images ----------------------------------------------------------


def test_rgb_jpeg_is_letterboxed_on_white_keeping_aspect_ratio():
    result = decode_image(encode(Image.new("RGB", (40, 20), RED), "JPEG", quality=95), SIZE)
    assert isinstance(result, DecodedImage)
    assert (result.width, result.height) == (40, 20)
    assert result.pixels.shape == (SIZE, SIZE, 3) and result.pixels.dtype == np.uint8
    # 40x20 -> 32x16, centred vertically: rows 8..23 are the picture.
    assert close(result.pixels[16, 16], RED)
    assert (result.pixels[:7] == 255).all() and (result.pixels[25:] == 255).all()
    assert close(result.pixels[9, 0], RED) and close(result.pixels[22, 31], RED)


def test_tall_image_is_padded_left_and_right():
    result = decode_image(encode(Image.new("RGB", (10, 40), BLUE), "PNG"), SIZE)
    assert (result.width, result.height) == (10, 40)
    assert (result.pixels[:, :10] == 255).all() and (result.pixels[:, 22:] == 255).all()
    assert tuple(result.pixels[16, 16]) == BLUE


def test_large_jpeg_decodes_at_reduced_scale_but_reports_original_size():
    data = encode(two_halves(3000, 2000), "JPEG", quality=90)
    result = decode_image(data, 224)
    assert (result.width, result.height) == (3000, 2000)
    assert close(result.pixels[112, 40], RED) and close(result.pixels[112, 200], BLUE)
    assert (result.pixels[:30] == 255).all()



@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("width,height", [(224, 224), (225, 224), (449, 500), (600, 600),
                                          (2000, 1000), (897, 2000), (100, 80)])
@pytest.mark.parametrize("progressive", [False, True])
def test_direct_jpeg_decoding_gives_pillows_exact_pixels(mode, width, height, progressive,
                                                         monkeypatch):
    # Plain JPEGs skip Pillow (twice as fast); a vector must not depend on which path ran.
    from pipeline import image_decode as decode

    rng = np.random.default_rng(width * height)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).convert(mode)
    data = encode(img, "JPEG", quality=90, progressive=progressive)
    assert decode._fast_jpeg_pixels(Image.open(io.BytesIO(data)), data, None, 224) is not None
    direct = decode_image(data, 224)
    monkeypatch.setattr(decode, "simplejpeg", None)
    through_pillow = decode_image(data, 224)
    np.testing.assert_array_equal(direct.pixels, through_pillow.pixels)
    assert (direct.width, direct.height) == (through_pillow.width, through_pillow.height)


def test_jpegs_needing_pillow_never_take_the_direct_path():
    from pipeline import image_decode as decode

    cmyk = encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")
    plain = encode(Image.new("RGB", (40, 40), RED), "JPEG")
    assert decode._fast_jpeg_pixels(Image.open(io.BytesIO(cmyk)), cmyk, None, SIZE) is None
    assert decode._fast_jpeg_pixels(Image.open(io.BytesIO(plain)), plain, 6, SIZE) is None
    cut = plain[:-20]  # libjpeg's complaint sends it to Pillow, which names it
    assert decode._fast_jpeg_pixels(Image.open(io.BytesIO(cut)), cut, None, SIZE) is None

def test_greyscale_jpeg_becomes_grey_rgb():
    result = decode_image(encode(Image.new("L", (16, 16), 100), "JPEG"), SIZE)
    pixel = result.pixels[16, 16]
    assert pixel[0] == pixel[1] == pixel[2] and abs(int(pixel[0]) - 100) <= 3


def test_bilevel_image_is_supported():
    result = decode_image(encode(Image.new("1", (8, 8), 0), "PNG"), SIZE)
    assert tuple(result.pixels[16, 16]) == (0, 0, 0)


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0] + list(RED) + [0] * (256 * 3 - 6))
    img.paste(1, (10, 0, 20, 20))  # right half red, left half index 0
    result = decode_image(encode(img, "PNG", transparency=0), SIZE)
    assert tuple(result.pixels[16, 4]) == (255, 255, 255)  # transparent index
    assert tuple(result.pixels[16, 28]) == RED


def test_cmyk_jpeg_red_comes_out_red():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixel = decode_image(data, SIZE).pixels[16, 16]
    assert pixel[0] > 200 and pixel[1] < 50 and pixel[2] < 50


def test_16_bit_png_gradient_spans_the_full_8_bit_range():
    gradient = np.tile(np.linspace(0, 65535, SIZE).round().astype(np.uint16), (SIZE, 1))
    data = encode(Image.fromarray(gradient), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    row = decode_image(data, SIZE).pixels[5, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert 110 <= row[SIZE // 2] <= 145  # mid-grey, not clipped to white


def test_rgba_transparent_pixels_become_white_and_alpha_blends():
    arr = np.zeros((20, 20, 4), dtype=np.uint8)
    arr[:, :10] = (0, 0, 0, 0)  # fully transparent black
    arr[:, 10:] = (0, 0, 0, 128)  # half-transparent black
    result = decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"), SIZE)
    assert tuple(result.pixels[16, 4]) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in result.pixels[16, 28])


def test_la_png_composites_on_white():
    arr = np.zeros((10, 10, 2), dtype=np.uint8)
    arr[:, 5:, 1] = 255  # right half opaque black, left transparent
    result = decode_image(encode(Image.fromarray(arr, "LA"), "PNG"), SIZE)
    assert tuple(result.pixels[16, 2]) == (255, 255, 255)
    assert tuple(result.pixels[16, 30]) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_uses_the_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert close(decode_image(data, SIZE).pixels[16, 16], RED, tol=20)


def test_static_webp():
    result = decode_image(encode(Image.new("RGB", (30, 30), GREEN), "WEBP", lossless=True), SIZE)
    assert tuple(result.pixels[16, 16]) == GREEN


@pytest.mark.parametrize("big", [False, True], ids=["small", "drafted"])
def test_exif_orientation_is_applied(big):
    # Stored 40x20 (left red, right blue); orientation 6 means "rotate 90°
    # clockwise to display", so it shows 20 wide, 40 tall, red on top.
    width, height = (4000, 2000) if big else (40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(two_halves(width, height), "JPEG", quality=95, exif=exif.tobytes())
    result = decode_image(data, SIZE)
    assert (result.width, result.height) == (height, width)
    assert close(result.pixels[4, 16], RED) and close(result.pixels[28, 16], BLUE)
    assert (result.pixels[:, :6] == 255).all() and (result.pixels[:, 26:] == 255).all()


def test_one_pixel_image_fills_the_canvas():
    result = decode_image(encode(Image.new("RGB", (1, 1), RED), "PNG"), SIZE)
    assert (result.width, result.height) == (1, 1)
    assert (result.pixels == np.array(RED, dtype=np.uint8)).all()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_very_thin_image_keeps_at_least_one_pixel_row(fmt):
    result = decode_image(encode(Image.new("RGB", (10000, 10), BLUE), fmt), SIZE)
    assert (result.width, result.height) == (10000, 10)
    blue_rows = [y for y in range(SIZE) if close(result.pixels[y, SIZE // 2], BLUE, tol=40)]
    assert 1 <= len(blue_rows) <= 2
    assert (result.pixels[0] == 255).all() and (result.pixels[-1] == 255).all()


def test_extension_does_not_matter_only_content(tmp_path):
    path = tmp_path / "photo.png"  # a JPEG named .png
    path.write_bytes(encode(Image.new("RGB", (8, 8), RED), "JPEG"))
    assert close(decode_image(path.read_bytes(), SIZE).pixels[16, 16], RED)


def test_loading_truncated_images_is_not_enabled():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- bad inputs ------------------------------------------------------------


def test_zero_bytes_is_empty():
    assert_decode_error(b"", "empty")


def test_random_bytes_are_not_an_image():
    assert_decode_error(np.random.default_rng(0).bytes(4096), "not_an_image")


def test_svg_is_its_own_unsupported_format_and_says_svg():
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    assert "SVG" in assert_decode_error(svg, "unsupported_svg").message


def test_html_error_page_is_not_an_image_and_says_html():
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>"
    assert "HTML" in assert_decode_error(html, "not_an_image").message


def test_plain_text_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "product.jpg"
    path.write_text("this is not really a picture\n")
    assert "text" in assert_decode_error(path.read_bytes(), "not_an_image").message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_files_are_reported_as_truncated(fmt, keep):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    assert_decode_error(data[: int(len(data) * keep)], "truncated")


def test_jpeg_cut_inside_its_header_is_truncated():
    data = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    assert_decode_error(data[:40], "truncated")


def test_jpeg_with_corrupt_header_is_corrupt():
    data = bytearray(encode(Image.new("RGB", (64, 64), RED), "JPEG"))
    data[2:60] = b"\x00" * 58  # wipe the markers after SOI
    error = assert_decode_error(bytes(data), "corrupt")
    assert "JPEG" in error.message


@pytest.mark.parametrize("side", [8_000, 100_000])
def test_decompression_bomb_is_refused_before_decoding(side):
    # 8000² is over our 50M default only; 100000² is over Pillow's own limit too.
    error = assert_decode_error(tiny_png_claiming(side, side), "too_many_pixels")
    assert "pixels" in error.message or "decompression bomb" in error.message.lower()


def test_max_pixels_limit_applies_to_real_images():
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert_decode_error(data, "too_many_pixels", max_pixels=9_999)
    assert decode_image(data, SIZE, max_pixels=10_000).width == 100


# --- property: only DecodeError ever escapes -------------------------------

_SEEDS = [
    encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)), fmt)
    for fmt in ("JPEG", "PNG", "GIF")
]


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _decode_or_decode_error(data: bytes) -> None:
    try:
        result = decode_image(data, SIZE, max_pixels=4_000_000)
    except DecodeError as exc:
        assert exc.reason and exc.message
        return
    assert result.pixels.shape == (SIZE, SIZE, 3) and result.pixels.dtype == np.uint8


_PROPERTY = settings(
    max_examples=100,  # two property tests: ~200 examples in all
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow],
)


@_PROPERTY
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_decode_error(data):
    _decode_or_decode_error(data)


@_PROPERTY
@given(mutated_images())
def test_mutated_images_decode_or_raise_decode_error(data):
    _decode_or_decode_error(data)


# --- the DoFn ----------------------------------------------------------------


def test_decode_fn_routes_good_rows_to_main_and_bad_rows_to_errors():
    good = encode(Image.new("RGB", (40, 20), RED), "PNG")
    rows = [
        FetchedRow("p1", "/img/p1.png", {"k": "v"}, good, "sha-1", "e1", None),
        FetchedRow("p2", "/img/p2.jpg", {}, b"", "sha-2", None, None),
        FetchedRow("p3", "/img/p3.jpg", {}, b"<html></html>", "sha-3", None, None),
    ]
    with test_pipeline.TestPipeline() as p:
        results = (
            p
            | beam.Create(rows)
            | beam.ParDo(DecodeImageFn(size=SIZE)).with_outputs(ERRORS, main="decoded")
        )
        summaries = results.decoded | "Summarise" >> beam.Map(
            lambda r: (
                type(r).__name__,
                r.product_id,
                r.extra,
                (r.sha256, r.etag),
                r.pixels.shape,
                str(r.pixels.dtype),
                r.width,
                r.height,
                tuple(int(v) for v in r.pixels[16, 16]),
            )
        )
        assert_that(
            summaries,
            equal_to([("DecodedRow", "p1", {"k": "v"}, ("sha-1", "e1"), (SIZE, SIZE, 3),
                       "uint8", 40, 20, RED)]),
            label="main",
        )
        errors = results[ERRORS] | "Reasons" >> beam.Map(
            lambda e: (e.product_id, e.image, e.stage, e.reason)
        )
        expected_errors = [
            ("p2", "/img/p2.jpg", "decode", "empty"),
            ("p3", "/img/p3.jpg", "decode", "not_an_image"),
        ]
        assert_that(errors, equal_to(expected_errors), label="errors")
