"""Read a shop-export CSV with multi-line quoted cells: exact, and how fast.

Usage::

    python bench/csv_manifest.py [--rows 50000] [--strays 50] [--rounds 3] [--seed 7]

It writes a Shopify-style manifest (``product_id, image, title, body_html,
vendor``) of ``--rows`` rows whose ``body_html`` is a quoted HTML description
of 3–15 lines (commas, doubled quotes, some CRLF line ends inside the cell),
then, ``--rounds`` times, interleaved, and reports the median of each:

(a) ``pipeline.csv_records.CsvReader``: the manifest reader's records, checked
    cell for cell against the rows written;
(b) ``ReadManifestRowsFn`` over the same file: what the pipeline's read stage
    does per file (records, the id rule, row dicts, carried cells);
(c) Python's ``csv.reader`` alone over the same text (no recovery wrapper):
    the floor of a serial RFC 4180 parse in Python;
(d) ``pyarrow.csv.read_csv(newlines_in_values=True)``, multi-threaded, for
    reference (exactness checked too; it has no recovery rule for bad quotes);

and once each:

(e) pyarrow's block reader as the pipeline used it before (``open_csv``,
    default ``newlines_in_values=False``): how many rows it reports or how it fails;
(f) the same manifest with ``--strays`` rows given an unclosed quote: every
    physical line must come back as a row or one error (a stray line), with
    the time against (a).

Each timing is printed with the CPU steal the machine saw meanwhile
(``bench/cpu_steal.py``); compare only figures of the same run. The exit code
is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_steal import StealMeter  # noqa: E402

HEADER = ["product_id", "image", "title", "body_html", "vendor"]
WORDS = ["soft", "cotton", "washed", "blue", "slim", "fit", "crew", "neck", "organic", "linen",
         "size", "wash", "cold", "durable", "classic", "é", "日本", "naïve"]


def _body(rng: random.Random) -> str:
    lines = ['<div class="description">']
    for _ in range(rng.randint(1, 13)):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        kind = rng.random()
        if kind < 0.2:
            lines.append(f'  <p style="margin: 0">{words}, "quoted", and more</p>')
        elif kind < 0.4:
            lines.append(f"  <li>{words}, {rng.randint(1, 99)} %</li>")
        else:
            lines.append(f"  <p>{words}.</p>")
    lines.append("</div>")
    sep = "\r\n" if rng.random() < 0.1 else "\n"
    return sep.join(lines)


def make_rows(n: int, seed: int) -> list[list[str]]:
    """``n`` product rows with multi-line HTML descriptions (deterministic)."""
    rng = random.Random(seed)
    return [[f"sku-{i:06d}", f"images/{i % 997}.jpg",
             " ".join(rng.choice(WORDS) for _ in range(4)).title(), _body(rng),
             rng.choice(["Acme", "Nord, Ltd.", 'The "Best" Co'])] for i in range(n)]


def write_csv(path: str, rows: list[list[str]]) -> int:
    """Write the rows as RFC 4180 CSV (quotes only where needed); return the bytes written."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    return os.path.getsize(path)


def read_records(path: str) -> list:
    from pipeline.csv_records import CsvReader

    with open(path, "rb") as handle:
        reader = CsvReader(handle)
        return list(reader)


def read_pipeline_rows(path: str) -> list:
    from pipeline.catalog import ManifestRowReader, inspect_catalog

    info = inspect_catalog(path)
    return list(ManifestRowReader(info).rows(path))


def read_csv_module(path: str) -> list:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, strict=True))[1:]


def read_pyarrow(path: str):
    import pyarrow.csv as pacsv

    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))


def pyarrow_block_reader(path: str) -> str:
    """What the old reader (open_csv, default parse options, 8 MB blocks) made of the file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    skipped = []
    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=8 << 20, use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=lambda r: skipped.append(r)
                                             or "skip"),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in HEADER}))
        rows = sum(batch.num_rows for batch in reader)
    except Exception as exc:  # noqa: BLE001 - the failure is the figure
        return f"failed: {type(exc).__name__}: {str(exc)[:110]}"
    return f"{rows:,} rows and {len(skipped):,} skipped as malformed"


def timed(fn, *args):
    with StealMeter() as meter:
        value = fn(*args)
    return value, meter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--strays", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import pyarrow.csv  # noqa: F401 - imported before timing, as a worker has them loaded

    import pipeline.catalog  # noqa: F401

    failures = []
    rows = make_rows(args.rows, args.seed)
    with tempfile.TemporaryDirectory(prefix="csv-manifest-") as tmp:
        path = os.path.join(tmp, "catalog.csv")
        size = write_csv(path, rows)
        with open(path, "rb") as handle:
            physical = len(handle.read().splitlines())
        print(f"manifest: {args.rows:,} rows, {physical:,} physical lines, {size / 1e6:.1f} MB")

        phases = {"(a) CsvReader": read_records, "(b) ReadManifestRowsFn": read_pipeline_rows,
                  "(c) csv.reader alone": read_csv_module, "(d) pyarrow newlines_in_values": read_pyarrow}
        times: dict = {name: [] for name in phases}
        steal: dict = {name: [] for name in phases}
        for round_ in range(args.rounds):
            for name, fn in phases.items():
                value, meter = timed(fn, path)
                times[name].append(meter.seconds)
                steal[name].append(meter.steal or 0.0)
                if round_ == 0:
                    failures += check(name, value, rows)
        base = statistics.median(times["(a) CsvReader"])
        for name in phases:
            t = statistics.median(times[name])
            print(f"{name:34s} {t:6.2f} s  {args.rows / t:9,.0f} rows/s  {size / 1e6 / t:5.1f} MB/s"
                  f"  {t / base:4.2f}x (a)  CPU steal {100 * max(steal[name]):.0f} % (max)")
        print(f"(e) pyarrow block reader (old): {pyarrow_block_reader(path)}")

        broken_rows, strays = with_strays(rows, args.strays, args.seed)
        broken = os.path.join(tmp, "broken.csv")
        write_broken(broken, broken_rows, strays)
        records, meter = timed(read_records, broken)
        errors = [r for r in records if r.problem is not None]
        good = [r for r in records if r.problem is None]
        expected_good = len(rows) - len(strays)
        print(f"(f) {len(strays)} stray quotes: {len(good):,} rows + {len(errors)} errors "
              f"({', '.join(sorted({e.problem[0] for e in errors}))}) in {meter.seconds:.2f} s, "
              f"{meter.seconds / base:4.2f}x (a){meter.label()}")
        good_ids = [r.cells[0] for r in good]
        if len(errors) != len(strays) or len(good) != expected_good:
            failures.append(f"(f) expected {expected_good} rows and {len(strays)} errors")
        if sorted(good_ids) != sorted(r[0] for i, r in enumerate(rows) if i not in strays):
            failures.append("(f) the rows read are not the rows without a stray quote")
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    print("all checks passed" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


def check(name: str, value, rows: list[list[str]]) -> list[str]:
    """Whether a phase read exactly the rows written."""
    if name.startswith("(a)"):
        got = [r.cells for r in value]
        problems = [r for r in value if r.problem is not None]
        if problems:
            return [f"{name}: {len(problems)} problem records, first {problems[0]}"]
    elif name.startswith("(b)"):
        bad = [r for r in value if "invalid" in r]
        if bad or len(value) != len(rows):
            return [f"{name}: {len(value)} rows, {len(bad)} invalid"]
        got = [[r["product_id"], r["image"].rsplit("/", 2)[-2] + "/" + r["image"].rsplit("/", 1)[-1],
                r["extra"]["title"], r["extra"]["body_html"], r["extra"]["vendor"]] for r in value]
    elif name.startswith("(c)"):
        got = value
    else:
        table = value
        got = [list(row) for row in zip(*(table.column(c).to_pylist() for c in HEADER))]
    if got != rows:
        first = next((i for i, (g, r) in enumerate(zip(got, rows)) if g != r), min(len(got), len(rows)))
        return [f"{name}: {len(got)} rows, first difference at row {first}"]
    print(f"{name}: all {len(rows):,} rows read exactly")
    return []


def with_strays(rows: list[list[str]], count: int, seed: int):
    """The rows, and the indices of ``count`` of them that get an unclosed quote."""
    rng = random.Random(seed + 1)
    strays = set(rng.sample(range(1, len(rows) - 1), min(count, max(len(rows) - 2, 0))))
    return rows, strays


def write_broken(path: str, rows: list[list[str]], strays: set) -> None:
    """Write the rows; a stray row's title cell opens a quote it never closes."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for i, row in enumerate(rows):
        if i in strays:
            # The title opens a quote; the row's other cells follow on the same line.
            out.write(f'{row[0]},{row[1]},"{row[2]} opens a quote,no html,Acme\n')
        else:
            writer.writerow(row)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(out.getvalue())


if __name__ == "__main__":
    sys.exit(main())
