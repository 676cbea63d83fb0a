"""Rows lost or corrupted: CSV by RFC 4180, Unicode in ids, non-string ids, loader-safe ids.

In the style of ``test_bad_inputs.py``: one pipeline run per manifest format
over a catalogue that mixes valid rows in awkward forms with every class of bad
row, and for each row the test knows the outcome — exactly one feature row, or
exactly one error line with the expected reason. The CSV run also checks that
every physical line after a broken quote is accounted for and that no two rows
were merged; the JSONL run that numeric ids become strings exactly or are
refused (never "1.0", "NaN" or "Infinity"); the Parquet run that an invalid
UTF-8 cell is one error row. The written JSONL files must hold one record per
line even for a reader that splits on Unicode line breaks, and no error line
may echo a URL's password. Loaders refuse an id no store can take.
"""

from __future__ import annotations

import csv
import decimal
import glob
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import files
from pipeline.catalog import inspect_catalog
from pipeline.csv_records import CsvReader
from pipeline.export import main as export_main
from pipeline.exporters.elastic import write_bulk_files
from pipeline.exporters.run_data import RunDataError, open_run
from pipeline.product_ids import (
    MAX_ID_BYTES,
    InvalidValue,
    printable,
    product_id_from,
    redact_userinfo,
)
from pipeline.run import run
from tests.conftest import shape_image
from tests.export_fixtures import write_run
from transforms.read_catalog import ReadManifestRowsFn


def png(kind: str, color: tuple) -> bytes:
    """A small PNG of a shape."""
    buf = io.BytesIO()
    shape_image(kind, color, size=48).save(buf, "PNG")
    return buf.getvalue()


IMAGES = {"a.png": png("square", (200, 30, 30)), "b.png": png("disc", (30, 30, 200)),
          "c.png": png("bar", (30, 160, 30))}
SECRET = "s3cret-pw"


@dataclass
class Outcome:
    """What one manifest record must become.

    ``pid`` set and ``reason`` None: a feature row with that id. ``reason`` set:
    one error line, found by ``pid`` (its product_id), or — for records the
    CSV reader could not parse, which have no id — by the physical ``line`` its
    message starts with, or by its ``image``.
    """

    pid: str | None = None
    reason: str | None = None
    line: int | None = None
    image: str | None = None
    carried: str | None = None  # the description a feature row must carry exactly


def q(cell: str) -> str:
    """One CSV cell, quoted by RFC 4180."""
    return '"' + cell.replace('"', '""') + '"'


class CsvBuilder:
    """Physical lines of a manifest, with the outcome each record must have."""

    def __init__(self):
        self.chunks: list[bytes] = [b"product_id,image,description\n"]
        self.outcomes: list[Outcome] = []
        self.lines = 1  # physical lines so far

    def raw(self, data: bytes, *outcomes: Outcome) -> int:
        """Append raw bytes; return the physical line they start on."""
        start = self.lines + 1
        self.chunks.append(data)
        self.lines += len(data.splitlines())
        self.outcomes.extend(outcomes)
        return start

    def row(self, pid, image="images/a.png", description="d", *, reason=None,
            err_pid=..., eol="\n") -> None:
        """A well-formed row of quoted cells (``pid`` may be raw bytes)."""
        cells = [pid if isinstance(pid, bytes) else q(pid).encode("utf-8"),
                 q(image).encode("utf-8"),
                 description if isinstance(description, bytes) else q(description).encode()]
        if reason is None:
            shown = pid.strip(" \t") if isinstance(pid, str) else None
            outcome = Outcome(pid=shown, carried=description if isinstance(description, str)
                              else None)
        else:
            outcome = Outcome(pid=(pid if err_pid is ... else err_pid), reason=reason,
                              image=image)
        self.raw(b",".join(cells) + eol.encode(), outcome)

    def bytes(self) -> bytes:
        return b"".join(self.chunks)


HTML = '<p class="lead">Soft, washed\ncotton.</p>\n<ul>\n  <li>S, M, L</li>\n</ul>'


def build_csv() -> CsvBuilder:
    """The CSV catalogue: every class of this issue, each row's outcome known."""
    b = CsvBuilder()
    b.row("plain")
    b.row("html-multiline", "images/b.png", HTML)
    b.row("crlf-in-cell", "images/c.png", "line one\r\nline two", eol="\r\n")
    b.row("comma-cell", description="a, b, c")
    b.row("  spaced  ")
    b.row("tab\tinside")
    b.row("nbsp\u00a0")  # a non-ASCII space is part of the id: not trimmed, not merged
    b.row("nbsp")
    b.row("sku1")
    b.row("sku1\x1f", reason="invalid_product_id")  # str.strip() merged it into sku1
    b.row("nel\x85id", reason="invalid_product_id")
    b.row("ls\u2028id", reason="invalid_product_id")
    b.row("ps\u2029id", reason="invalid_product_id")
    b.row("nul\x00id", reason="invalid_product_id")
    b.row("esc\x1bid", reason="invalid_product_id")
    b.row("M" * MAX_ID_BYTES)
    b.row("é" * (MAX_ID_BYTES // 2))  # 512 bytes of UTF-8
    b.row("L" * (MAX_ID_BYTES + 1), reason="product_id_too_long")
    b.row("é" * (MAX_ID_BYTES // 2 + 1), reason="product_id_too_long")
    b.row("日本-ü")
    b.row(b"bad\xffid", "images/bad-utf8.png", reason="invalid_utf8", err_pid=None)
    b.row("latin1-description", description=b"caf\xe9")
    b.row("nul-image", "images/a\x00.png", reason="invalid_image")
    b.row("", f"http://bob:{SECRET}@127.0.0.1:9/x.jpg", reason="missing_product_id",
          err_pid="")
    b.row("dup")
    b.row(" dup", "images/b.png", reason="duplicate_product_id", err_pid="dup")
    # A single line with one cell too many, quoting a URL with a password.
    line = b.lines + 1
    b.raw(f"extra,http://bob:{SECRET}@h.example/x.jpg,a,b\n".encode(),
          Outcome(reason="malformed_csv_row", line=line))
    line = b.lines + 1
    b.raw(b'junk,"images/a.png"x,d\n', Outcome(reason="malformed_csv_row", line=line))
    # A stray quote mid-file: its cell would swallow the six unquoted rows after it
    # and close at the next row's first quote. It is one error; the rest are rows.
    line = b.lines + 1
    b.raw(b'stray,"images/a.png,opens a quote\n', Outcome(reason="unterminated_quote", line=line))
    for n in range(6):
        b.raw(f"after-stray-{n},images/b.png,plain\n".encode(),
              Outcome(pid=f"after-stray-{n}", carried="plain"))
    b.row("after-stray-quoted")
    # A stray quote that closes at a line end: one record of the wrong cell count.
    line = b.lines + 1
    b.raw(b'w1,"images/a.png,x\n', Outcome(reason="unterminated_quote", line=line))
    b.raw(b'w2,images/c.png,y"\n', Outcome(pid="w2", carried='y"'))
    b.row("before-eof", "images/c.png", "multi\nline\nbefore the end")
    # An unterminated quote near the end of the file: the lines after it still run.
    line = b.lines + 1
    b.raw(b'eof,"images/a.png,never closed\n', Outcome(reason="unterminated_quote", line=line))
    b.raw(b"after-eof-1,images/a.png,z\n", Outcome(pid="after-eof-1", carried="z"))
    b.raw(b"after-eof-2,images/b.png,z", Outcome(pid="after-eof-2", carried="z"))
    return b


def run_catalog(directory: Path, name: str, data: bytes, model: str, *extra) -> dict:
    """Write the images and the manifest, run the pipeline; return its run's outputs."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    for image, content in IMAGES.items():
        (images / image).write_bytes(content)
    manifest = directory / name
    manifest.write_bytes(data)
    result = run([f"--input={manifest}", f"--output={directory / 'out'}", f"--model={model}",
                  "--top_k=2", "--force_publish", *extra])
    out = Path(result["run_dir"])
    tables = [pq.read_table(p) for p in sorted(glob.glob(f"{out}/features/*.parquet"))]
    features: dict = {}
    for row in (pa.concat_tables(tables).to_pylist() if tables else []):
        assert row["product_id"] not in features, row["product_id"]
        features[row["product_id"]] = row
    raw_errors = b"".join(Path(p).read_bytes() for p in sorted(glob.glob(f"{out}/errors/*.jsonl")))
    errors = [json.loads(line) for line in raw_errors.split(b"\n") if line.strip()]
    return {"manifest": result, "features": features, "errors": errors,
            "raw_errors": raw_errors, "dir": out, "base": directory}


def assert_outcomes(result: dict, outcomes: list[Outcome]) -> None:
    """Every record is exactly its one feature row or its one error line; nothing else."""
    features, errors = result["features"], result["errors"]
    expected_ok = [o for o in outcomes if o.reason is None]
    expected_bad = [o for o in outcomes if o.reason is not None]
    assert set(features) == {o.pid for o in expected_ok}
    for outcome in expected_ok:
        if outcome.carried is not None:
            assert features[outcome.pid]["description"] == outcome.carried, outcome.pid
    claimed: set = set()
    for outcome in expected_bad:
        if outcome.line is not None:
            found = [i for i, e in enumerate(errors)
                     if e["error"].startswith((f"manifest line {outcome.line} ",
                                               f"manifest line {outcome.line}:"))]
        elif outcome.pid is not None:
            found = [i for i, e in enumerate(errors) if e["product_id"] == outcome.pid]
        else:
            found = [i for i, e in enumerate(errors)
                     if e["product_id"] is None and (e["image"] or "").endswith(outcome.image)]
        assert len(found) == 1, (outcome, [errors[i] for i in found])
        error = errors[found[0]]
        assert (error["stage"], error["reason"]) == ("read", outcome.reason), error
        assert "Traceback" not in error["error"] and len(error["error"]) >= 20
        claimed.add(found[0])
    assert len(claimed) == len(errors) == len(expected_bad), errors
    counts = result["manifest"]["counts"]
    assert counts["input"] == len(outcomes)
    assert (counts["embedded"], counts["failed"]) == (len(expected_ok), len(expected_bad))


def assert_one_record_per_line(raw: bytes, records: int) -> None:
    """No reader can split a line: no raw Unicode line break, no lone surrogate."""
    for needle in (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9"):
        assert needle not in raw
    text = raw.decode("utf-8")  # strict: a lone surrogate would not have been encodable
    assert len(text.splitlines()) == records


CSV = build_csv()


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, tiny_model) -> dict:
    return run_catalog(tmp_path_factory.mktemp("csv"), "catalog.csv", CSV.bytes(), tiny_model)


def test_csv_every_record_is_one_feature_row_or_one_error_line(csv_run):
    assert_outcomes(csv_run, CSV.outcomes)


def test_csv_multiline_cells_are_carried_exactly(csv_run):
    assert csv_run["features"]["html-multiline"]["description"] == HTML
    assert csv_run["features"]["crlf-in-cell"]["description"] == "line one\r\nline two"
    assert csv_run["features"]["w2"]["description"] == 'y"'  # a quote in an unquoted cell


def test_csv_id_cleaning_never_merges_two_ids(csv_run):
    features = csv_run["features"]
    assert "sku1" in features and "sku1\x1f" not in features
    assert "nbsp" in features and "nbsp\u00a0" in features
    assert features["spaced"]["image"].endswith("images/a.png")
    [dup] = [e for e in csv_run["errors"] if e["reason"] == "duplicate_product_id"]
    assert "appears 2 times" in dup["error"]


def test_csv_error_lines_never_echo_control_characters_or_passwords(csv_run):
    for error in csv_run["errors"]:
        assert not any(not c.isprintable() for c in error["error"]), error["error"]
        assert SECRET not in json.dumps(error), error
    [creds] = [e for e in csv_run["errors"] if e["reason"] == "missing_product_id"]
    assert creds["image"] == "http://***@127.0.0.1:9/x.jpg"


def test_csv_error_file_has_one_record_per_line(csv_run):
    assert_one_record_per_line(csv_run["raw_errors"], len(csv_run["errors"]))
    nel = [e for e in csv_run["errors"] if e["product_id"] == "nel\x85id"]
    assert len(nel) == 1 and "U+0085" in nel[0]["error"]


def test_csv_neighbour_files_have_one_record_per_line(csv_run):
    raw = b"".join(Path(p).read_bytes()
                   for p in sorted(glob.glob(f"{csv_run['dir']}/neighbors/*.jsonl")))
    assert_one_record_per_line(raw, len(csv_run["features"]))


# --- JSONL: numeric ids, lone surrogates, invalid UTF-8, Unicode line breaks ----------

def jsonl_cases() -> tuple[bytes, list[Outcome]]:
    """JSONL lines (raw bytes) and their outcomes."""
    lines: list[bytes] = []
    outcomes: list[Outcome] = []

    def add(id_json: str, pid=None, reason=None, image="images/a.png", note='"n"',
            carried="n"):
        lines.append(f'{{"product_id": {id_json}, "image": "{image}", "note": {note}}}'
                     .encode("utf-8"))
        outcomes.append(Outcome(pid=pid, reason=reason, image=image if reason else None))
        outcomes[-1].carried = carried if reason is None else None

    add("7", pid="7")
    add("-12", pid="-12")
    add("12345678901234567890123", pid="12345678901234567890123")
    add('"0042"', pid="0042")
    add("1e400", reason="non_string_id", image="images/inf.png")
    add("-1e400", reason="non_string_id", image="images/ninf.png")
    add("1.0", reason="non_string_id", image="images/float.png")
    add("3.5", reason="non_string_id", image="images/frac.png")
    add("NaN", reason="non_string_id", image="images/nan.png")
    add("Infinity", reason="non_string_id", image="images/infinity.png")
    add("true", reason="non_string_id", image="images/bool.png")
    add('["x"]', reason="non_string_id", image="images/list.png")
    add('{"x": 1}', reason="non_string_id", image="images/obj.png")
    add("null", reason="missing_product_id", image="images/null.png")
    add("1" + "0" * 600, reason="product_id_too_long", image="images/huge-int.png")
    add('"lone\\ud800"', reason="invalid_utf8", image="images/surrogate.png")
    add('"nel\\u0085"', pid="nel\x85", reason="invalid_product_id", image="images/nel.png")
    add('"raw\u2028ls"', pid="raw\u2028ls", reason="invalid_product_id", image="images/ls.png")
    add('"ok-note-surrogate"', pid="ok-note-surrogate", note='"x\\udc80y"', carried="x\ufffdy")
    add('"ok-note-breaks"', pid="ok-note-breaks", note='"a\u2028b\u0085c"',
        carried="a\u2028b\u0085c")
    add('"image-ls"', pid="image-ls", reason="invalid_image", image="images/a\u2028.png")
    lines.append(b'{"product_id": "bad\xff", "image": "images/raw-bad.png", "note": "n"}')
    outcomes.append(Outcome(reason="invalid_utf8", image="images/raw-bad.png"))
    lines.append(b'{"product_id": "ok-raw-bad-note", "image": "images/b.png", "note": "\xfe"}')
    outcomes.append(Outcome(pid="ok-raw-bad-note", carried="\ufffd"))
    lines.append('{"product_id": "ok-odd-key", "image": "images/c.png", "note": "n", '
                 '"k\\udc80": 1}'.encode())
    outcomes.append(Outcome(pid="ok-odd-key", carried="n"))
    return b"\n".join(lines) + b"\n", outcomes


JSONL, JSONL_OUTCOMES = jsonl_cases()


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory, tiny_model) -> dict:
    return run_catalog(tmp_path_factory.mktemp("jsonl"), "catalog.jsonl", JSONL, tiny_model)


def test_jsonl_every_row_is_one_feature_row_or_one_error_line(jsonl_run):
    for outcome in JSONL_OUTCOMES:
        if outcome.reason is None:
            assert jsonl_run["features"][outcome.pid]["note"] == outcome.carried
    assert_outcomes(jsonl_run, [Outcome(o.pid, o.reason, o.line, o.image) for o in
                                JSONL_OUTCOMES])


def test_jsonl_key_that_is_not_unicode_is_carried_under_a_repaired_name(jsonl_run):
    assert jsonl_run["features"]["ok-odd-key"]["k\ufffd"] == "1"
    assert jsonl_run["features"]["7"]["k\ufffd"] is None


def test_jsonl_numbers_never_become_float_text(jsonl_run):
    ids = set(jsonl_run["features"])
    for text in ("1.0", "3.5", "NaN", "nan", "Infinity", "inf", "-Infinity", "True"):
        assert text not in ids
    messages = {e["image"].rsplit("/", 1)[-1]: e["error"] for e in jsonl_run["errors"]
                if e["reason"] == "non_string_id"}
    assert "NaN" in messages["nan.png"] and "infinite" in messages["inf.png"]
    assert all(e["product_id"] is None for e in jsonl_run["errors"]
               if e["reason"] == "non_string_id")


def test_jsonl_error_file_has_one_record_per_line(jsonl_run):
    assert_one_record_per_line(jsonl_run["raw_errors"], len(jsonl_run["errors"]))


# --- Parquet: invalid UTF-8 cells, numeric id columns ----------------------------------

def test_parquet_invalid_utf8_cell_is_one_error_row(tmp_path, tiny_model):
    ids = pa.array([b"p-ok", b"p-bad\xff", b"p-note", b"p-tags", b"p-last"],
                   pa.binary()).view(pa.string())
    images = pa.array([b"images/a.png", b"images/b.png", b"images/c.png", b"images/a.png",
                       b"images/\xc3("], pa.binary()).view(pa.string())
    notes = pa.array([b"fine", b"x", b"caf\xe9", b"y", b"z"], pa.binary()).view(pa.string())
    tags = pa.array([[b"t"], [b"t"], [b"t"], [b"\xff"], [b"t"]],
                    pa.list_(pa.binary())).view(pa.list_(pa.string()))
    buf = io.BytesIO()
    pq.write_table(pa.table({"product_id": ids, "image": images, "note": notes, "tags": tags}),
                   buf)
    result = run_catalog(tmp_path, "catalog.parquet", buf.getvalue(), tiny_model,
                         "--features_only")
    assert_outcomes(result, [Outcome(pid="p-ok"), Outcome(reason="invalid_utf8",
                                                          image="images/b.png"),
                             Outcome(pid="p-note"),
                             Outcome(pid="p-tags", reason="invalid_utf8"),
                             Outcome(pid="p-last", reason="invalid_utf8")])
    assert result["features"]["p-note"]["note"] == "caf\ufffd"
    assert result["features"]["p-ok"]["tags"] == '["t"]'


def _read(path: Path) -> list[dict]:
    info = inspect_catalog(str(path))
    return list(ReadManifestRowsFn(info).process(str(path)))


@pytest.mark.parametrize("values, kind, expected", [
    ([1.0, 3.0, float("nan"), 2.5, float("inf"), None], pa.float64(),
     ["non_string_id"] * 5 + ["missing_product_id"]),
    ([1, -3, 2 ** 63 - 1, None], pa.int64(), ["1", "-3", str(2 ** 63 - 1), "missing_product_id"]),
    ([7, 255], pa.uint8(), ["7", "255"]),
    ([True, False], pa.bool_(), ["non_string_id", "non_string_id"]),
    ([decimal.Decimal("12"), decimal.Decimal("1.50")], pa.decimal128(5, 2),
     ["12", "non_string_id"]),
])
def test_parquet_numeric_ids_are_exact_or_refused(tmp_path, values, kind, expected):
    path = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": pa.array(values, kind),
                             "image": [f"{i}.png" for i in range(len(values))]}), path)
    got = [r.invalid[0] if r.invalid is not None else r.product_id for r in _read(path)]
    assert got == expected


# --- the CSV reader itself -------------------------------------------------------------

def _parse(data: bytes, **kwargs) -> tuple[list, list]:
    reader = CsvReader(io.BytesIO(data), **kwargs)
    return reader.columns, list(reader)


def test_csv_reader_round_trips_random_rfc4180_files_exactly():
    rng = random.Random(4180)
    alphabet = ['a', 'b', ',', '"', '\n', '\r\n', ' ', 'é', '\u2028', '\x85', '<p>', '""', '\t']
    for trial in range(40):
        rows = [[f"id{trial}-{n}"] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
                                      for _ in range(3)] for n in range(rng.randint(1, 60))]
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator=rng.choice(["\n", "\r\n"]))
        writer.writerow(["product_id", "image", "x", "y"])
        writer.writerows(rows)
        columns, records = _parse(out.getvalue().encode("utf-8"))
        assert columns == ["product_id", "image", "x", "y"]
        assert all(r.problem is None for r in records), [r for r in records if r.problem]
        assert [r.cells for r in records] == rows


def test_csv_reader_stays_exact_past_pyarrows_block_size():
    # pyarrow's block reader lost sync on an 18 MB export; 3 MB of multi-line cells
    # spans several of its 1 MB blocks.
    description = '"<div>\n' + "<p>line, with comma</p>\n" * 20 + '</div>"'
    body = "".join(f"id{n},img{n}.jpg,{description}\n" for n in range(6000))
    _, records = _parse(("product_id,image,description\n" + body).encode())
    assert len(records) == 6000 and all(r.problem is None for r in records)
    assert records[5999].cells[0] == "id5999" and records[5999].line == 2 + 5999 * 22


def test_csv_reader_accounts_for_every_line_after_a_quote_it_cannot_close():
    data = b'product_id,image\na,"x.jpg\nb,y.jpg\nc,z.jpg\nd,"never\ne,w.jpg'
    _, records = _parse(data)
    assert [(r.line, r.cells, r.problem and r.problem[0]) for r in records] == [
        (2, None, "unterminated_quote"), (3, ["b", "y.jpg"], None), (4, ["c", "z.jpg"], None),
        (5, None, "unterminated_quote"), (6, ["e", "w.jpg"], None)]
    assert "closes on line 5" in records[0].problem[1]
    assert "lines 3–5 are read again" in records[0].problem[1]


def test_csv_reader_bounds_a_quoted_cell_by_lines():
    lines = "".join(f"r{n},i{n}.jpg\n" for n in range(10))
    _, records = _parse(f'product_id,image\nx,"open\n{lines}'.encode(), max_record_lines=4)
    assert records[0].problem[0] == "unterminated_quote" and "within 4 lines" in records[0].problem[1]
    assert [r.cells[0] for r in records[1:]] == [f"r{n}" for n in range(10)]


def test_csv_reader_skips_bom_and_blank_lines_and_keeps_bad_bytes_per_cell():
    columns, records = _parse(b'\xef\xbb\xbfproduct_id,image\n\nok,a.jpg\n\nbad\xff,b.jpg\n')
    assert columns == ["product_id", "image"]
    assert [r.line for r in records] == [3, 5]
    assert records[1].cells[0] == "bad\udcff"  # refused later by the id rule


# --- the id rule -----------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("  a b  ", "a b"), ("\ta\r\n", "a"), ("x\ty", "x\ty"), ("é\u00a0", "é\u00a0"),
    (b"bytes", "bytes"), (42, "42"), (-7, "-7"), (decimal.Decimal("10"), "10"),
    ("NaN", "NaN"),  # a string is an id, whatever it says
])
def test_id_rule_accepts(value, expected):
    assert product_id_from(value) == expected


@pytest.mark.parametrize("value, reason", [
    (None, "missing_product_id"), ("  ", "missing_product_id"), ("\x1f", "invalid_product_id"),
    ("a\x00b", "invalid_product_id"), ("a\x85", "invalid_product_id"),
    ("a\u2028", "invalid_product_id"), ("a\x7f", "invalid_product_id"),
    ("a\udc80", "invalid_utf8"), (b"\xff", "invalid_utf8"), (1.0, "non_string_id"),
    (float("nan"), "non_string_id"), (float("-inf"), "non_string_id"), (True, "non_string_id"),
    (decimal.Decimal("NaN"), "non_string_id"), ([1], "non_string_id"),
    ("x" * 513, "product_id_too_long"), (10 ** 600, "product_id_too_long"),
])
def test_id_rule_refuses(value, reason):
    with pytest.raises(InvalidValue) as info:
        product_id_from(value)
    assert info.value.reason == reason
    assert all(c.isprintable() for c in info.value.message)


def test_messages_escape_and_redact():
    assert printable("a\x00b\u2028c\udcff") == "'a\\x00b\\u2028c\\udcff'"
    assert redact_userinfo("see https://u:p@h.example/x and ftp://a@b/c") == (
        "see https://***@h.example/x and ftp://***@b/c")
    assert redact_userinfo("mail bob@example.com") == "mail bob@example.com"


def test_json_line_writers_escape_unicode_line_breaks(tmp_path):
    records = [{"product_id": "a\x85b\u2028c\u2029d", "x": "\ud800"}, {"product_id": "é"}]
    lines = [files.json_line(r) for r in records]
    assert_one_record_per_line("\n".join(lines).encode("utf-8"), 2)
    assert [json.loads(line) for line in lines] == records
    path = str(tmp_path / "x.jsonl")
    files.write_jsonl(path, [{"product_id": "a\x85b\u2028c\u2029d"}, {"product_id": "é"}])
    raw = Path(path).read_bytes()
    assert_one_record_per_line(raw, 2)
    assert json.loads(raw.split(b"\n")[0])["product_id"] == "a\x85b\u2028c\u2029d"


# --- loaders refuse ids no store can take ----------------------------------------------

def test_elasticsearch_refuses_an_id_over_512_bytes(tmp_path):
    fake = write_run(str(tmp_path / "run"), count=6, prefix="x" * 510, awkward_ids=False)
    with pytest.raises(RunDataError, match="product_id_too_long"):
        write_bulk_files(open_run(fake.path), str(tmp_path / "es"))
    assert not (tmp_path / "es" / "export.json").exists()


def test_sqlite_refuses_a_nul_id_and_publishes_nothing(tmp_path, capsys):
    fake = write_run(str(tmp_path / "run"), count=6, prefix="p\x00", awkward_ids=False)
    db = tmp_path / "similar.db"
    assert export_main([f"--run={fake.path}", "sqlite", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid_product_id" in err[0] and "U+0000" in err[0]
