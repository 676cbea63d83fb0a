"""No bad input can hurt a run: one pipeline run over a catalogue full of broken rows.

A single module-scoped run embeds one CSV manifest that mixes valid images in
unusual forms (CMYK, 16-bit, palette transparency, animated GIF, 1×1,
10000×10, EXIF rotation, a JPEG behind a ``.png`` URL, 500-then-200…) with
every kind of bad row a shop's export or an image host produces (empty,
random, truncated and corrupt files, decompression bombs, SVG/HTML/text named
``.jpg``, directories, missing files, forbidden schemes, 404/500, stalled,
hanging and endless downloads, redirect loops, refused connections, duplicate
and empty ids, non-UTF-8 cells). For every row the test knows the outcome:
it is embedded (and its embedding matches a reference where one exists), or
it is exactly one line in ``errors/`` with the expected stage, reason and a
sentence a person can act on; and the manifest's counts add up.

A second run, without ``--allow_private_hosts``, checks that URLs on private,
loopback, link-local and metadata addresses are refused before any
connection is opened. Start-up failures (unusable catalogues) are checked
through ``main()``: exit code 2 and one ``error:`` line, no traceback.

Network traffic only ever goes to the local test server on 127.0.0.1: a
socket guard refuses (and records) any other connection attempt.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import socket
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.run import main, run
from tests.conftest import TINY_DIM, shape_image
from tests.http_fixtures import JPEG as SERVED_JPEG
from tests.http_fixtures import LocalHttpServer

MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 1_000_000
RUN_OPTIONS = (
    "--allow_private_hosts",
    "--fetch_timeout=1",
    "--fetch_retries=1",
    f"--max_image_bytes={MAX_IMAGE_BYTES}",
    f"--max_image_pixels={MAX_IMAGE_PIXELS}",
    "--fetch_concurrency=16",
    "--top_k=3",
)

# --- building the inputs ----------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Save ``img`` in ``fmt`` and return the file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


REFERENCE = shape_image("square", (200, 30, 30))
REFERENCE_JPEG = encode(REFERENCE, "JPEG", quality=92)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b""))


def grey_gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """An 8-bit grey ramp with a dark block, so the picture is not uniform."""
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    ramp[10:30, 10:30] = 20
    return ramp


def png_16bit() -> bytes:
    """A 16-bit greyscale PNG whose values are exactly 257 × the 8-bit gradient."""
    wide = grey_gradient().astype(np.uint16) * 257
    return encode(Image.fromarray(wide), "PNG")


def palette_with_transparency() -> tuple[bytes, bytes]:
    """A palette PNG whose index 0 is transparent, and the same picture flattened on white."""
    index = np.zeros((60, 60), dtype=np.uint8)
    index[15:45, 15:45] = 1
    index[25:35, :] = 2
    img = Image.fromarray(index, mode="P")
    img.putpalette([0, 0, 0, 30, 30, 200, 30, 160, 30] + [0] * (256 - 3) * 3)
    rgb = np.array(img.convert("RGB"))
    rgb[index == 0] = 255
    return encode(img, "PNG", transparency=0), encode(Image.fromarray(rgb), "PNG")


def animated_gif() -> tuple[bytes, bytes]:
    """A three-frame GIF of different shapes, and its first frame as a PNG."""
    frames = [shape_image("disc", (30, 30, 200)), shape_image("bar", (30, 160, 30)),
              shape_image("triangle", (220, 180, 20))]
    frames = [f.quantize(colors=8) for f in frames]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(gif)) as opened:
        assert getattr(opened, "n_frames", 1) == 3
        first = opened.convert("RGB")
    return gif, encode(first, "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 60×30 JPEG whose EXIF orientation (6) says it is shown rotated: 30×60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(shape_image("bar", (30, 160, 30)).resize((60, 30)), "JPEG", exif=exif)


def corrupt_jpeg_header() -> bytes:
    """A JPEG whose markers after SOI are wiped."""
    data = bytearray(REFERENCE_JPEG)
    data[2:60] = b"\x00" * 58
    return bytes(data)


def random_bytes(n: int, seed: int) -> bytes:
    """Seeded random bytes that do not start like any image format."""
    return b"\x01" + np.random.default_rng(seed).bytes(n - 1)


def noisy_png(size: int = 64) -> bytes:
    """A PNG of noise (incompressible, so a cut through it is truly mid-data)."""
    noise = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "PNG")


SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
       b'height="10"><rect width="10" height="10" fill="red"/></svg>\n')
HTML = b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>\n"


class Context:
    """Where a case's input lives: image files next to the manifest and the local server."""

    def __init__(self, directory: Path, server: LocalHttpServer, closed_port: int):
        self.directory = directory
        self.server = server
        self.closed_port = closed_port
        (directory / "images").mkdir(parents=True, exist_ok=True)

    def file(self, name: str, data: bytes) -> str:
        """Write ``data`` as images/``name``; return the manifest's relative path."""
        (self.directory / "images" / name).write_bytes(data)
        return f"images/{name}"

    def folder(self, name: str) -> str:
        """Create a directory images/``name``; return the manifest's relative path."""
        (self.directory / "images" / name).mkdir(exist_ok=True)
        return f"images/{name}"

    def url(self, path: str) -> str:
        """A URL on the local test server."""
        return self.server.url(path)

    def resolved(self, cell: str) -> str:
        """What the pipeline reports as the image of a manifest cell."""
        if "://" in cell or cell.startswith("/") or not cell.strip():
            return cell.strip()
        return str(self.directory / cell)


_SAME = object()


@dataclass(frozen=True)
class Case:
    """One manifest row and the outcome the run must give it.

    ``stage`` None means the row must be embedded; otherwise it must be one
    error line with ``stage``/``reason`` whose message contains each of
    ``words`` (case-insensitive).
    """

    name: str
    image: Callable[[Context], str]
    stage: str | None = None
    reason: str | None = None
    words: tuple = ()
    pid: object = _SAME  # the id cell (str or raw bytes); default: name
    error_pid: object = _SAME  # the product_id of the error line; default: the id
    size: tuple | None = None  # (width, height) the feature row must report
    like: str | None = None  # a case whose embedding this row's must equal
    extra: bytes = b"catalog"  # the carried "family" cell, raw bytes

    @property
    def id_cell(self) -> bytes:
        """The raw bytes of the row's id cell."""
        value = self.name if self.pid is _SAME else self.pid
        return value if isinstance(value, bytes) else value.encode("utf-8")

    @property
    def product_id(self):
        """The product_id the row's feature row or error line must carry."""
        if self.error_pid is not _SAME:
            return self.error_pid
        return self.id_cell.decode("utf-8").strip()


def ok(name, image, **kwargs) -> Case:
    """A row that must be embedded."""
    return Case(name, image, **kwargs)


def bad(name, image, stage, reason, *words, **kwargs) -> Case:
    """A row that must be exactly one error line."""
    return Case(name, image, stage=stage, reason=reason, words=words, **kwargs)


PALETTE_PNG, PALETTE_FLAT_PNG = palette_with_transparency()
GIF, GIF_FIRST_FRAME = animated_gif()
NOISY_PNG = noisy_png()

CASES = [
    # --- valid, in unusual forms: must be embedded -------------------------------
    ok("jpeg", lambda c: c.file("jpeg.jpg", REFERENCE_JPEG), size=(96, 96)),
    ok("jpeg-trailing-garbage", lambda c: c.file("trailing.jpg", REFERENCE_JPEG + b"\x00junk" * 200),
       like="jpeg"),
    ok("jpeg-named-png", lambda c: c.file("really-a-jpeg.png", REFERENCE_JPEG), like="jpeg"),
    ok("cmyk-jpeg", lambda c: c.file("cmyk.jpg", encode(REFERENCE.convert("CMYK"), "JPEG",
                                                         quality=92)), size=(96, 96)),
    ok("png-8bit-grey", lambda c: c.file("grey8.png", encode(Image.fromarray(grey_gradient()),
                                                              "PNG"))),
    ok("png-16bit", lambda c: c.file("grey16.png", png_16bit()), like="png-8bit-grey",
       size=(64, 48)),
    ok("png-transparent-flattened", lambda c: c.file("flat.png", PALETTE_FLAT_PNG)),
    ok("png-palette-transparency", lambda c: c.file("palette.png", PALETTE_PNG),
       like="png-transparent-flattened"),
    ok("gif-first-frame", lambda c: c.file("first-frame.png", GIF_FIRST_FRAME)),
    ok("gif-animated", lambda c: c.file("animated.gif", GIF), like="gif-first-frame"),
    ok("png-1x1", lambda c: c.file("one.png", encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG")),
       size=(1, 1)),
    ok("png-10000x10", lambda c: c.file("wide.png", encode(Image.new("RGB", (10000, 10), "navy"),
                                                            "PNG")), size=(10000, 10)),
    ok("jpeg-exif-rotated", lambda c: c.file("rotated.jpg", exif_rotated_jpeg()), size=(30, 60)),
    ok("webp", lambda c: c.file("pic.webp", encode(REFERENCE, "WEBP", lossless=True)),
       size=(96, 96)),
    ok("tiff", lambda c: c.file("pic.tiff", encode(REFERENCE, "TIFF")), size=(96, 96)),
    ok("bmp", lambda c: c.file("pic.bmp", encode(REFERENCE, "BMP")), size=(96, 96)),
    ok("id-with-spaces", lambda c: c.file("spaces.png", encode(REFERENCE, "PNG")),
       pid="  id-with-spaces  "),
    ok("non-utf8-other-column", lambda c: c.file("latin1.png", encode(REFERENCE, "PNG")),
       extra=b"caf\xe9"),
    ok("duplicate-kept", lambda c: c.file("dup-first.png", encode(REFERENCE, "PNG")),
       pid="duplicate"),
    ok("url-jpeg", lambda c: c.url("image.jpg"), size=(32, 24)),
    ok("url-jpeg-at-png-url", lambda c: c.url("photo.png"), like="url-jpeg"),
    ok("url-redirect", lambda c: c.url("redirect"), like="url-jpeg"),
    ok("url-500-then-200", lambda c: c.url("flaky/bad-inputs"), like="url-jpeg"),
    ok("url-429-retry-after-then-200", lambda c: c.url("throttled/bad-inputs"), like="url-jpeg"),
    # --- bad files: decode errors ------------------------------------------------
    bad("zero-bytes", lambda c: c.file("zero.jpg", b""), "decode", "empty", "empty"),
    bad("random-bytes", lambda c: c.file("random.jpg", random_bytes(5000, 1)), "decode",
        "not_an_image", "not an image"),
    bad("truncated-jpeg", lambda c: c.file("truncated.jpg", REFERENCE_JPEG[: len(REFERENCE_JPEG) // 2]),
        "decode", "truncated", "truncated"),
    bad("truncated-png", lambda c: c.file("truncated.png", NOISY_PNG[: len(NOISY_PNG) // 2]),
        "decode", "truncated", "truncated"),
    bad("jpeg-cut-in-header", lambda c: c.file("cut-header.jpg", REFERENCE_JPEG[:40]), "decode",
        "truncated", "truncated"),
    bad("jpeg-corrupt-header", lambda c: c.file("corrupt.jpg", corrupt_jpeg_header()), "decode",
        "corrupt", "JPEG", "damaged"),
    bad("bomb-crafted-header", lambda c: c.file("bomb.png", png_claiming(100_000, 100_000)),
        "decode", "too_many_pixels", "pixels"),
    bad("over-pixel-limit", lambda c: c.file("big.png", encode(Image.new("RGB", (1001, 1000)),
                                                                "PNG")),
        "decode", "too_many_pixels", "1001×1000", "limit"),
    bad("svg", lambda c: c.file("vector.svg", SVG), "decode", "unsupported_svg", "SVG"),
    bad("text-named-jpg", lambda c: c.file("notes.jpg", b"product photo coming soon\n"), "decode",
        "not_an_image", "plain text"),  # never quoted (issue 15)
    bad("html-named-jpg", lambda c: c.file("page.jpg", HTML), "decode", "not_an_image", "HTML"),
    bad("json-named-jpg", lambda c: c.file("api.jpg", b'{"error": "not found"}'), "decode",
        "not_an_image", "JSON"),
    # --- bad locations: read errors ----------------------------------------------
    bad("directory", lambda c: c.folder("a-folder.jpg"), "read", "is_directory", "directory"),
    bad("missing-file", lambda c: "images/does-not-exist.jpg", "read", "missing_file",
        "does-not-exist.jpg", "does not exist"),
    bad("over-byte-limit", lambda c: c.file("huge.jpg", REFERENCE_JPEG + b"\x00" * MAX_IMAGE_BYTES),
        "read", "too_large", "limit"),
    bad("file-url", lambda c: f"file://{c.directory}/images/jpeg.jpg", "read", "forbidden_scheme",
        "file://"),
    bad("ftp-url", lambda c: "ftp://127.0.0.1/images/jpeg.jpg", "read", "forbidden_scheme", "ftp"),
    bad("url-404", lambda c: c.url("status/404"), "read", "http_404", "404", "/status/404"),
    bad("url-500-always", lambda c: c.url("status/500"), "read", "http_500", "500", "retries"),
    bad("url-stalls-mid-body", lambda c: c.url("stall"), "read", "timeout", "stopped sending"),
    bad("url-never-answers", lambda c: c.url("hang"), "read", "timeout", "did not answer"),
    bad("url-redirect-loop", lambda c: c.url("loop/0"), "read", "too_many_redirects", "redirected"),
    bad("url-endless-body", lambda c: c.url("endless"), "read", "too_large", "limit"),
    bad("url-connection-refused", lambda c: f"http://127.0.0.1:{c.closed_port}/x.jpg", "read",
        "connection_error", "connect"),
    bad("url-https-to-plain-http-server", lambda c: c.url("image.jpg").replace("http:", "https:"),
        "read", "ssl_error", "TLS"),
    bad("url-port-out-of-range", lambda c: "http://127.0.0.1:99999/x.jpg", "read", "invalid_url",
        "malformed"),
    bad("url-without-host", lambda c: "http:///x.jpg", "read", "invalid_url", "no host"),
    bad("url-html-as-image-jpeg", lambda c: c.url("html-as-jpeg"), "decode", "not_an_image", "HTML"),
    # --- bad manifest rows -------------------------------------------------------
    bad("duplicate-dropped", lambda c: c.file("dup-second.png", encode(REFERENCE, "PNG")), "read",
        "duplicate_product_id", "appears 2 times", "kept manifest row", pid="duplicate"),
    bad("empty-id", lambda c: c.file("no-id.png", encode(REFERENCE, "PNG")), "read",
        "missing_product_id", "no product_id", pid=""),
    bad("empty-image", lambda c: "", "read", "missing_image", "no image"),
    bad("blank-image", lambda c: "   ", "read", "missing_image", "no image"),
    bad("non-utf8-id", lambda c: c.file("latin1-id.png", encode(REFERENCE, "PNG")), "read",
        "invalid_utf8", "UTF-8", pid=b"caf\xe9-id", error_pid=None),
]
BY_NAME = {case.name: case for case in CASES}
VALID = [c for c in CASES if c.stage is None]
FAILING = [c for c in CASES if c.stage is not None]
assert len(BY_NAME) == len(CASES)


def _quote(cell: bytes) -> bytes:
    return b'"' + cell.replace(b'"', b'""') + b'"'


def write_manifest(path: Path, rows: list[tuple[bytes, bytes, bytes]]) -> None:
    """Write a CSV manifest from raw byte cells (so rows may hold non-UTF-8 bytes)."""
    lines = [b"product_id,image,family"]
    lines += [b",".join(_quote(cell) for cell in row) for row in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")


# --- network guard ------------------------------------------------------------------


@contextlib.contextmanager
def loopback_only():
    """Refuse and record every TCP connection attempt that is not to 127.0.0.1."""
    attempts: list = []
    refused: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if isinstance(address, tuple):
            attempts.append(address)
            if address[0] != "127.0.0.1":
                refused.append(address)
                raise ConnectionRefusedError(f"test guard: no connection may go to {address}")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        yield attempts, refused


def free_closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the run ------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one pipeline run left behind."""

    out: Path
    manifest: dict
    features: dict = field(default_factory=dict)  # product_id -> feature row
    errors: list = field(default_factory=list)
    attempts: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    context: Context | None = None
    cells: dict = field(default_factory=dict)  # case name -> image cell written

    def location(self, case: Case) -> str:
        """The image location the pipeline must report for ``case``."""
        return self.context.resolved(self.cells[case.name])


def read_jsonl(pattern: str) -> list[dict]:
    """All JSON lines of the files matching ``pattern``."""
    lines = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    return lines


def collect(manifest: dict) -> RunResult:
    """Load a finished run's features and error lines (from the run's own directory)."""
    out = Path(manifest["run_dir"])
    tables = [pq.read_table(p) for p in sorted(glob.glob(f"{out}/features/*.parquet"))]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    features: dict = {}
    for row in rows:
        assert row["product_id"] not in features, f"{row['product_id']} has two feature rows"
        features[row["product_id"]] = row
    return RunResult(out, manifest, features, read_jsonl(f"{out}/errors/*.jsonl"))


@pytest.fixture(scope="module")
def server():
    """The misbehaving local HTTP server, for the whole module."""
    srv = LocalHttpServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_model, server) -> RunResult:
    """One run of the tiny model over the manifest of every case."""
    directory = tmp_path_factory.mktemp("bad-inputs")
    context = Context(directory, server, free_closed_port())
    cells = {case.name: case.image(context) for case in CASES}
    rows = [(case.id_cell, cells[case.name].encode("utf-8"), case.extra) for case in CASES]
    manifest_path = directory / "catalog.csv"
    write_manifest(manifest_path, rows)
    out = directory / "out"
    with loopback_only() as (attempts, refused):
        manifest = run([f"--input={manifest_path}", f"--output={out}", f"--model={tiny_model}",
                        *RUN_OPTIONS, "--force_publish"])  # mostly bad rows: past the guard
    result = collect(manifest)
    result.attempts, result.refused, result.context = attempts, refused, context
    result.cells = cells
    return result


def vector(result: RunResult, case: Case) -> np.ndarray:
    """The embedding of ``case`` in ``result``."""
    return np.asarray(result.features[case.product_id]["embedding"], dtype=np.float32)


# --- every row: embedded or exactly one error line ----------------------------------


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.name)
def test_valid_row_is_embedded(bad_run, case):
    row = bad_run.features.get(case.product_id)
    assert row is not None, f"{case.name} was not embedded; errors: " + str(
        [e for e in bad_run.errors if e["product_id"] == case.product_id])
    assert row["image"] == bad_run.location(case)
    vec = vector(bad_run, case)
    assert vec.shape == (TINY_DIM,) and np.isfinite(vec).all()
    if case.size is not None:
        assert (row["width"], row["height"]) == case.size
    if case.like is not None:
        np.testing.assert_allclose(vec, vector(bad_run, BY_NAME[case.like]), atol=1e-5)
    if case.name != "duplicate-kept":  # its dropped twin is the one error line of that id
        assert [e for e in bad_run.errors if e["product_id"] == case.product_id] == []


@pytest.mark.parametrize("case", FAILING, ids=lambda c: c.name)
def test_bad_row_is_exactly_one_error_line(bad_run, case):
    lines = [e for e in bad_run.errors if e["product_id"] == case.product_id]
    assert len(lines) == 1, lines
    line = lines[0]
    assert set(line) == {"product_id", "image", "stage", "reason", "error"}
    assert (line["stage"], line["reason"]) == (case.stage, case.reason), line["error"]
    message = line["error"]
    assert isinstance(message, str) and len(message) >= 20 and "Traceback" not in message
    for word in case.words:
        assert word.lower() in message.lower(), (word, message)
    if case.reason != "invalid_utf8":
        assert line["image"] == bad_run.location(case)
    if case.product_id is not None and case.product_id != "":
        assert case.product_id not in bad_run.features or case.product_id == "duplicate"


def test_counts_add_up_and_name_every_reason(bad_run):
    counts = bad_run.manifest["counts"]
    assert counts["input"] == len(CASES)
    assert counts["embedded"] == len(VALID) == len(bad_run.features)
    assert counts["failed"] == len(FAILING) == len(bad_run.errors)
    assert counts["embedded"] + counts["failed"] == counts["input"]
    expected = Counter(f"{c.stage}:{c.reason}" for c in FAILING)
    assert counts["failed_by_reason"] == dict(expected)
    assert "read:internal_error" not in counts["failed_by_reason"]


def test_nothing_else_is_embedded_and_every_embedded_row_has_neighbours(bad_run):
    assert set(bad_run.features) == {c.product_id for c in VALID}
    neighbours = read_jsonl(f"{bad_run.out}/neighbors/*.jsonl")
    assert sorted(n["product_id"] for n in neighbours) == sorted(bad_run.features)
    assert all(len(n["neighbors"]) == 3 for n in neighbours)


def test_duplicate_id_keeps_the_first_row(bad_run):
    kept = bad_run.features["duplicate"]
    assert kept["image"].endswith("images/dup-first.png")
    dropped = [e for e in bad_run.errors if e["product_id"] == "duplicate"]
    assert dropped[0]["image"].endswith("images/dup-second.png")


def test_carried_column_with_bad_bytes_is_replaced_not_fatal(bad_run):
    assert bad_run.features["non-utf8-other-column"]["family"] == "caf\ufffd"
    assert bad_run.features["jpeg"]["family"] == "catalog"


def test_downloads_are_the_served_bytes(bad_run):
    served = hashlib.sha256(SERVED_JPEG).hexdigest()
    for name in ("url-jpeg", "url-jpeg-at-png-url", "url-redirect", "url-500-then-200",
                 "url-429-retry-after-then-200"):
        assert bad_run.features[name]["sha256"] == served, name


def test_cmyk_jpeg_keeps_its_colours(bad_run):
    # A CMYK file decoded with inverted or swapped channels would embed far away.
    cmyk, rgb = vector(bad_run, BY_NAME["cmyk-jpeg"]), vector(bad_run, BY_NAME["jpeg"])
    assert float(cmyk @ rgb) > 0.995


def test_retries_happened_and_were_bounded(bad_run):
    hits = bad_run.context.server.hits
    assert hits["/flaky/bad-inputs"] == 2
    assert hits["/throttled/bad-inputs"] == 2
    assert hits["/status/500"] == 2  # --fetch_retries=1: one try and one retry
    assert hits["/status/404"] == 1  # a 404 is final
    assert 1 <= hits["/hang"] <= 2


def test_no_connection_left_the_loopback_interface(bad_run):
    assert bad_run.refused == []
    assert bad_run.attempts, "the guard saw no connection at all; is it wired in?"


# --- private addresses are refused before connecting --------------------------------

PRIVATE_URLS = {
    "private-10": "http://10.0.0.1/x.jpg",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "loopback": "{server}/private-probe",
    "localhost-name": "http://localhost:{port}/private-probe",
    "loopback-octal": "http://0177.0.0.1:{port}/private-probe",
    "loopback-decimal": "http://2130706433:{port}/private-probe",
    "ipv6-loopback": "http://[::1]:{port}/private-probe",
    "ipv4-mapped-private": "http://[::ffff:10.0.0.1]/x.jpg",
    "unspecified": "http://0.0.0.0:{port}/private-probe",
    "redirect-to-metadata": "{server}/redirect-to?http://169.254.169.254/",
}


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, tiny_model, server) -> RunResult:
    """A run without --allow_private_hosts over private URLs and one valid file."""
    directory = tmp_path_factory.mktemp("private")
    (directory / "ok.jpg").write_bytes(REFERENCE_JPEG)
    base = server.url("").rstrip("/")
    rows = [(b"ok", b"ok.jpg", b"x")]
    for name, template in PRIVATE_URLS.items():
        url = template.format(server=base, port=server.port)
        rows.append((name.encode(), url.encode(), b"x"))
    manifest_path = directory / "catalog.csv"
    write_manifest(manifest_path, rows)
    out = directory / "out"
    with loopback_only() as (attempts, refused):
        manifest = run([f"--input={manifest_path}", f"--output={out}", f"--model={tiny_model}",
                        "--fetch_timeout=1", "--fetch_retries=0", "--top_k=3",
                        "--force_publish"])  # mostly bad rows: past the publish guard
    result = collect(manifest)
    result.attempts, result.refused = attempts, refused
    return result


def test_private_urls_are_refused_without_a_connection(private_run, server):
    errors = {e["product_id"]: e for e in private_run.errors}
    assert set(errors) == set(PRIVATE_URLS)
    for name, line in errors.items():
        assert (line["stage"], line["reason"]) == ("read", "private_host"), line
        assert "non-public address" in line["error"] and "allow_private_hosts" in line["error"]
    assert private_run.attempts == []  # refused before any socket connected
    assert server.hits["/private-probe"] == 0 and server.hits["/redirect-to"] == 0
    counts = private_run.manifest["counts"]
    assert (counts["input"], counts["embedded"], counts["failed"]) == (
        1 + len(PRIVATE_URLS), 1, len(PRIVATE_URLS))
    assert set(private_run.features) == {"ok"}


# --- start-up failures: exit code 2 and one sentence --------------------------------


def _empty_parquet(path: Path) -> None:
    pq.write_table(pa.table({"product_id": pa.array([], pa.string()),
                             "image": pa.array([], pa.string())}), path)


STARTUP_FAILURES = {
    "empty-csv": ("catalog.csv", lambda p: p.write_bytes(b""), "is empty"),
    "blank-lines-csv": ("catalog.csv", lambda p: p.write_bytes(b"\n\n"), "is empty"),
    "header-only-csv": ("catalog.csv", lambda p: p.write_bytes(b"product_id,image\n"),
                        "header but no rows"),
    "no-image-column": ("catalog.csv", lambda p: p.write_bytes(b"product_id,url\nx,a.jpg\n"),
                        "no column 'image'"),
    "missing-manifest": ("catalog.csv", lambda p: None, "does not exist"),
    "empty-jsonl": ("catalog.jsonl", lambda p: p.write_bytes(b""), "is empty"),
    "header-only-parquet": ("catalog.parquet", _empty_parquet, "header but no rows"),
    "garbage-parquet": ("catalog.parquet", lambda p: p.write_bytes(b"not parquet at all"),
                        "cannot read manifest"),
    "glob-matches-nothing": ("images/*.jpg", lambda p: p.parent.mkdir(), "no file matches"),
}


@pytest.mark.parametrize("name", list(STARTUP_FAILURES))
def test_unusable_catalogue_is_exit_2_and_one_error_line(name, tmp_path, tiny_model, capsys):
    relative, make, phrase = STARTUP_FAILURES[name]
    path = tmp_path / relative
    make(path)
    out = tmp_path / "out"
    code = main([f"--input={path}", f"--output={out}", f"--model={tiny_model}"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert phrase in lines[0] and str(path) in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()  # nothing was started, nothing half-written


def test_unknown_model_is_exit_2_and_one_error_line(tmp_path, capsys):
    manifest = tmp_path / "catalog.csv"
    manifest.write_text("product_id,image\na,a.jpg\n")
    code = main([f"--input={manifest}", f"--output={tmp_path / 'out'}",
                 f"--model={tmp_path / 'no-such-model'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --model=")


# --- catalogues that are bad as a whole, row by row -----------------------------------


def test_csv_row_with_wrong_cell_count_is_one_error_not_a_failed_run(tmp_path, tiny_model):
    (tmp_path / "a.jpg").write_bytes(REFERENCE_JPEG)
    (tmp_path / "c.jpg").write_bytes(REFERENCE_JPEG)
    manifest = tmp_path / "catalog.csv"
    manifest.write_bytes(b"product_id,image,family\na,a.jpg,x\nb,b.jpg,shoes, red\nc,c.jpg,z\n")
    out = tmp_path / "out"
    result = run([f"--input={manifest}", f"--output={out}", f"--model={tiny_model}",
                  "--top_k=1"])
    counts = result["counts"]
    assert (counts["input"], counts["embedded"], counts["failed"]) == (3, 2, 1)
    [line] = read_jsonl(f"{result['run_dir']}/errors/*.jsonl")
    assert line["stage"] == "read" and line["reason"] == "malformed_csv_row"
    assert "line 3" in line["error"]


def test_catalogue_where_every_row_fails_still_completes(tmp_path, tiny_model):
    manifest = tmp_path / "catalog.csv"
    manifest.write_bytes(b"product_id,image\na,missing.jpg\nb,http://10.0.0.1/x.jpg\n")
    out = tmp_path / "out"
    with loopback_only() as (attempts, _):
        result = run([f"--input={manifest}", f"--output={out}", f"--model={tiny_model}",
                      "--force_publish"])  # the publish guard refuses an all-failed run
    counts = result["counts"]
    assert attempts == []
    assert (counts["input"], counts["embedded"], counts["failed"]) == (2, 0, 2)
    reasons = sorted(e["reason"] for e in read_jsonl(f"{result['run_dir']}/errors/*.jsonl"))
    assert reasons == ["missing_file", "private_host"]
