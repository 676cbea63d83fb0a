"""Show a run: one self-contained HTML page of its numbers and sample neighbour lists.

``python -m pipeline.report --run=RUN_DIR [--n=50] [--out=RUN_DIR/report.html]
[--compare=RUN_B] [--seed=0] [--neighbors=8] [--label=articleType]``

``--run`` and ``--compare`` take a run directory or an output root (then its
``LATEST`` run is shown, and the page is written into that run's directory).

The page has the run's summary (counts, failures by reason, model, timings,
``evaluation.json`` figures when present), a histogram of top-1 similarities
and a grid of ``n`` products sampled by ``seed``, each with its top neighbours
and their similarity. With ``--compare`` the same products' neighbours from a
second run stand in a second column headed by that run's model, so two
embeddings can be judged by eye. ``--label`` names a manifest column carried
in the features (e.g. ``articleType``) to caption every picture, and marks
neighbours whose label matches the product's.

Everything is inside the one file: thumbnails are small JPEGs in ``data:``
URIs, the histogram is inline SVG, the style is inline, there is no script,
and a Content-Security-Policy forbids loading anything else. It opens from
``file://`` with no network and can be mailed or attached to a ticket.
Images the report cannot show (URLs, which it never fetches; files gone or
broken since the run) appear as labelled placeholder boxes.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import files, publish, run_reader
from pipeline.image_decode import DecodeError, decode_image
from pipeline.locations import is_url
from pipeline.run_layout import EVALUATION_FILE, REPORT_FILE

THUMBNAIL_SIZE = 96
THUMBNAIL_QUALITY = 80
HISTOGRAM_BINS = 20
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class RunData:
    """What the report shows of one run, read from its output directory."""

    path: str
    manifest: dict
    evaluation: dict | None
    images: dict  # product id → image location
    labels: dict  # product id → label text (empty without --label)
    neighbors: dict  # product id → [(product id, similarity), …]
    errors: list = field(default_factory=list)  # a few error records, as written

    @property
    def model(self) -> str:
        """The model id the run embedded with (its column header)."""
        return str(self.manifest.get("model") or self.path)


def _read_features(run_dir: str, label: str | None) -> tuple[dict, dict]:
    """product id → image, and product id → label, from the run's feature shards."""
    images, labels = {}, {}
    for path in run_reader.feature_paths(run_dir):
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(pa.PythonFile(handle, mode="r"))
            names = parquet.schema_arrow.names
            if label and label not in names:
                raise ValueError(f"--label={label}: the features of {run_dir} have no such "
                                 f"column; they have {', '.join(names)}")
            columns = ["product_id", "image"] + ([label] if label else [])
            table = parquet.read(columns=columns)
        ids = table.column("product_id").to_pylist()
        images.update(zip(ids, table.column("image").to_pylist()))
        if label:
            labels.update((pid, value) for pid, value in zip(ids, table.column(label).to_pylist())
                          if value not in (None, ""))
    return images, labels


def load_run(run_dir: str, label: str | None = None, error_examples: int = 10) -> RunData:
    """Read a run's manifest, evaluation, features (ids, images) and neighbour lists.

    Why: the report is built from the output contract alone, so it works on
    any finished run, local or on an object store, without re-running anything.
    ``run_dir`` may be a run directory, an output root (its ``LATEST`` run is
    shown) or ``ROOT/LATEST``.
    """
    run_dir = publish.resolve_run(run_dir)
    manifest = run_reader.read_manifest(run_dir)
    if manifest is None and not run_reader.feature_paths(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run output directory (no manifest.json "
                                f"and no features/)")
    images, labels = _read_features(run_dir, label)
    return RunData(path=run_dir, manifest=manifest or {},
                   evaluation=run_reader.read_json_file(run_dir, EVALUATION_FILE),
                   images=images, labels=labels,
                   neighbors=run_reader.read_neighbor_lists(run_dir),
                   errors=list(itertools.islice(run_reader.iter_error_records(run_dir),
                                                error_examples)))


def sample_products(runs: list[RunData], n: int, seed: int = 0) -> list[str]:
    """``n`` product ids, the same for the same runs and seed, present in every run.

    Products with neighbour lists are preferred (they are what the page is
    for); the sample is drawn from the sorted ids, so it does not depend on
    shard order.
    """
    ids = set(runs[0].images)
    for run in runs[1:]:
        ids &= set(run.images)
    with_lists = sorted(pid for pid in ids if all(run.neighbors.get(pid) for run in runs))
    pool = with_lists or sorted(ids)
    if n >= len(pool):
        return pool
    chosen = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in chosen]


class Thumbnails:
    """Small JPEG ``data:`` URIs of image locations, made once per location.

    A location that cannot be shown gets ``None`` and a reason: URLs are
    never fetched (a report must not make network requests), missing or
    undecodable files are reported as such.
    """

    def __init__(self, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY):
        self._size = size
        self._quality = quality
        self._cache: dict = {}

    def prefetch(self, locations, threads: int = 8) -> None:
        """Make the thumbnails of many locations, reading several at a time."""
        todo = sorted({loc for loc in locations if loc and loc not in self._cache})
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for location, result in zip(todo, pool.map(self._make, todo)):
                self._cache[location] = result

    def get(self, location: str | None) -> tuple[str | None, str]:
        """``(data URI or None, reason when None)`` for one image location."""
        if not location:
            return None, "no image"
        if location not in self._cache:
            self._cache[location] = self._make(location)
        return self._cache[location]

    def _make(self, location: str) -> tuple[str | None, str]:
        if is_url(location):
            return None, "URL (not fetched)"
        try:
            with FileSystems.open(location) as handle:
                data = handle.read()
        except Exception:  # noqa: BLE001 - any read failure shows the same placeholder
            return None, "image missing"
        try:
            pixels = decode_image(data, self._size).pixels
        except DecodeError as exc:
            return None, f"cannot decode ({exc.reason})"
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=self._quality, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


def histogram_svg(values, title: str, bins: int = HISTOGRAM_BINS,
                  width: int = 560, height: int = 210) -> str:
    """An inline SVG bar chart of similarity values (hover a bar for its range and count)."""
    esc = html.escape
    if not len(values):
        return f'<p class="muted">{esc(title)}: no neighbour lists in this run.</p>'
    data = np.asarray(values, dtype=np.float64)
    low = min(float(np.floor(data.min() * 10) / 10), 0.9)
    high = max(1.0, float(np.ceil(data.max() * 10) / 10))
    counts, edges = np.histogram(data, bins=bins, range=(low, high))
    left, right, top, bottom = 44, width - 10, 26, height - 30
    bar_w = (right - left) / bins
    peak = max(int(counts.max()), 1)
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{left}" y="16" class="svg-title">{esc(title)} '
             f'(n={len(data)}, median {np.median(data):.3f})</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" class="axis"/>',
             f'<text x="{left - 6}" y="{top + 4}" class="tick" text-anchor="end">{peak}</text>',
             f'<text x="{left - 6}" y="{bottom}" class="tick" text-anchor="end">0</text>']
    for i, count in enumerate(counts):
        h = (bottom - top) * count / peak
        x = left + i * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{bottom - h:.1f}" width="{bar_w - 2:.1f}" '
                     f'height="{h:.1f}" class="bar"><title>{edges[i]:.3f} to '
                     f'{edges[i + 1]:.3f}: {int(count)}</title></rect>')
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + frac * (right - left)
        value = low + frac * (high - low)
        tick = f"{value:.3f}".rstrip("0").rstrip(".")
        parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" class="tick" '
                     f'text-anchor="middle">{tick}</text>')
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;
  color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.muted{color:#777}table.facts{border-collapse:collapse;margin:6px 0;font-size:13px}
table.facts td,table.facts th{border:1px solid #ddd;padding:3px 8px;text-align:left;
  vertical-align:top}
table.facts th{background:#f0f0f0}.charts{display:flex;flex-wrap:wrap;gap:16px}
svg .bar{fill:#4a7fb5}svg .axis{stroke:#888}svg .tick{font-size:10px;fill:#555}
svg .svg-title{font-size:12px;fill:#222}
table.grid{border-collapse:collapse;width:100%}
table.grid>thead th{position:sticky;top:0;background:#fafafa;text-align:left;font-size:13px;
  padding:6px;border-bottom:2px solid #ccc}
table.grid>tbody>tr>td{border-bottom:1px solid #e3e3e3;padding:8px 6px;vertical-align:top}
.cards{display:flex;flex-wrap:wrap;gap:6px}
.card{width:100px;font-size:11px;line-height:1.25;overflow-wrap:anywhere}
.card img,.card .ph{width:96px;height:96px;border:2px solid #ddd;background:#fff;
  box-sizing:content-box}
.card img{display:block}
.card.query img,.card.query .ph{border-color:#333}
.card.match img,.card.match .ph{border-color:#2e9d4a}
.card .ph{display:flex;align-items:center;justify-content:center;text-align:center;
  font-size:10px;color:#888;
  background:repeating-linear-gradient(45deg,#f4f4f4,#f4f4f4 6px,#ebebeb 6px,#ebebeb 12px)}
.sim{font-weight:600}.label{color:#555}.shared{font-size:11px;color:#555;margin-bottom:4px}
"""


def _facts_table(rows: list[tuple[str, list]], header: list | None = None) -> str:
    esc = html.escape
    out = ['<table class="facts">']
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>")
    for name, values in rows:
        cells = "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in values)
        out.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            _flatten(f"{prefix}.{key}" if prefix else str(key), value[key], out)
    else:
        out.append((prefix, value))


def _summary(runs: list[RunData]) -> str:
    """Counts, model and timings of each run in one table, failures and evaluation below."""
    def get(run, *keys):
        value = run.manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    rows = [("run", [r.path for r in runs]), ("model", [r.model for r in runs]),
            ("engine", [get(r, "engine") for r in runs]), ("dim", [get(r, "dim") for r in runs]),
            ("top_k", [get(r, "top_k") for r in runs]),
            ("input rows", [get(r, "counts", "input") for r in runs]),
            ("embedded", [get(r, "counts", "embedded") for r in runs]),
            ("failed", [get(r, "counts", "failed") for r in runs]),
            ("search", [get(r, "index", "search") for r in runs]),
            ("with full neighbour list", [get(r, "neighbors", "with_full_list") for r in runs]),
            ("wall seconds", [get(r, "timings", "wall_seconds") for r in runs]),
            ("images per second", [get(r, "timings", "images_per_second") for r in runs]),
            ("index build seconds", [get(r, "timings", "index_build_seconds") for r in runs]),
            ("finished at", [get(r, "timings", "finished_at") for r in runs])]
    parts = ["<h2>Summary</h2>"]
    if any(not r.manifest for r in runs):
        parts.append('<p class="muted">A run without manifest.json is incomplete or still '
                     'running; its numbers are missing.</p>')
    parts.append(_facts_table(rows))
    reasons = sorted({k for r in runs for k in (get(r, "counts", "failed_by_reason") or {})})
    parts.append("<h2>Failures by reason</h2>")
    if reasons:
        parts.append(_facts_table(
            [(k, [(get(r, "counts", "failed_by_reason") or {}).get(k, 0) for r in runs])
             for k in reasons], header=["reason"] + [r.model for r in runs]))
    else:
        parts.append('<p class="muted">No failed rows.</p>')
    examples = [(e.get("product_id"), [e.get("stage"), e.get("reason"), e.get("error")])
                for e in runs[0].errors]
    if examples:
        parts.append(f'<p class="muted">First {len(examples)} failed rows of {runs[0].model}:</p>')
        parts.append(_facts_table([(str(pid), vals) for pid, vals in examples],
                                  header=["product", "stage", "reason", "error"]))
    if any(r.evaluation for r in runs):
        keys: list = []
        flat = []
        for run in runs:
            items: list = []
            _flatten("", {k: v for k, v in (run.evaluation or {}).items() if k != "run"}, items)
            flat.append(dict(items))
            keys.extend(k for k, _ in items if k not in keys)
        parts.append("<h2>Evaluation</h2>")
        parts.append(_facts_table([(k, [f.get(k) for f in flat]) for k in keys],
                                  header=[""] + [r.model for r in runs]))
    return "".join(parts)


def _card(thumbs: Thumbnails, run: RunData, pid: str, caption: str, css: str) -> str:
    esc = html.escape
    uri, reason = thumbs.get(run.images.get(pid))
    label = run.labels.get(pid)
    title = esc(f"{pid} — {run.images.get(pid) or 'no image'}")
    if uri:
        picture = f'<img src="{uri}" alt="{esc(pid)}" title="{title}" width="96" height="96">'
    else:
        picture = f'<div class="ph" title="{title}">{esc(reason)}</div>'
    text = f"<div>{caption}</div><div>{esc(pid)}</div>"
    if label is not None:
        text += f'<div class="label">{esc(str(label))}</div>'
    return f'<div class="card {css}">{picture}{text}</div>'


def _neighbor_cell(thumbs: Thumbnails, run: RunData, pid: str, shown: int,
                   other: list | None) -> str:
    neighbors = run.neighbors.get(pid, [])[:shown]
    if not neighbors:
        return '<td><p class="muted">no neighbour list</p></td>'
    own_label = run.labels.get(pid)
    cards = []
    for rank, (nid, similarity) in enumerate(neighbors, 1):
        match = own_label is not None and run.labels.get(nid) == own_label
        caption = f'#{rank} <span class="sim">{similarity:.3f}</span>'
        cards.append(_card(thumbs, run, nid, caption, "match" if match else ""))
    head = ""
    if other is not None:
        shared = len({n for n, _ in neighbors} & set(other))
        head = f'<div class="shared">{shared} of {len(neighbors)} also in the other run</div>'
    return f'<td>{head}<div class="cards">{"".join(cards)}</div></td>'


def render_report(runs: list[RunData], sample: list[str], thumbs: Thumbnails,
                  shown: int = 8, title: str | None = None) -> str:
    """The complete HTML page (a string) for one run or two runs side by side."""
    esc = html.escape
    title = title or ("Similar products: " + " vs ".join(r.model for r in runs))
    charts = "".join(histogram_svg([v[0][1] for v in r.neighbors.values() if v],
                                   f"top-1 similarity, {r.model}") for r in runs)
    header = "".join(f"<th>{esc(r.model)}</th>" for r in runs)
    body_rows = []
    for pid in sample:
        query = _card(thumbs, runs[0], pid, "product", "query")
        lists = [[n for n, _ in r.neighbors.get(pid, [])[:shown]] for r in runs]
        cells = "".join(
            _neighbor_cell(thumbs, run, pid, shown,
                           lists[1 - i] if len(runs) == 2 else None)
            for i, run in enumerate(runs))
        body_rows.append(f"<tr><td>{query}</td>{cells}</tr>")
    legend = ("Green frame: same label as the product. " if any(r.labels for r in runs) else "")
    return "".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">{esc(" | ".join(r.path for r in runs))}</p>',
        _summary(runs),
        f'<h2>Top-1 similarity</h2><div class="charts">{charts}</div>',
        f"<h2>{len(sample)} sample products, top {shown} neighbours</h2>",
        f'<p class="muted">{esc(legend)}Similarity is the cosine of the two embeddings.</p>',
        f'<table class="grid"><thead><tr><th>product</th>{header}</tr></thead>',
        f"<tbody>{''.join(body_rows)}</tbody></table>",
        "</body></html>\n",
    ])


def write_report(run_dir: str, out: str | None = None, n: int = 50, compare: str | None = None,
                 seed: int = 0, shown: int = 8, label: str | None = None) -> str:
    """Build the report of a run (optionally against a second run) and write it; returns its path.

    Why: a person judges "do these look alike?" in seconds from pictures,
    which no number in manifest.json or evaluation.json can replace.
    """
    if n < 1 or shown < 1:
        raise ValueError("--n and --neighbors must be at least 1")
    runs = [load_run(run_dir, label)] + ([load_run(compare, label)] if compare else [])
    sample = sample_products(runs, n, seed)
    thumbs = Thumbnails()
    needed = []
    for run in runs:
        for pid in sample:
            needed.append(run.images.get(pid))
            needed.extend(run.images.get(nid) for nid, _ in run.neighbors.get(pid, [])[:shown])
    thumbs.prefetch(needed)
    page = render_report(runs, sample, thumbs, shown)
    target = out or files.join(runs[0].path, REPORT_FILE)
    files.write_bytes(target, page.encode("utf-8"))
    return target


def main(argv=None) -> int:
    """Console entry: write the report and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="run directory, or an output root (its LATEST run)")
    parser.add_argument("--out", help="where to write the page (default RUN/report.html)")
    parser.add_argument("--n", type=int, default=50, help="sample products shown")
    parser.add_argument("--compare", help="a second run (or root): its neighbours in a second "
                                          "column")
    parser.add_argument("--seed", type=int, default=0, help="seed of the product sample")
    parser.add_argument("--neighbors", type=int, default=8, help="neighbours shown per product")
    parser.add_argument("--label", help="manifest column to caption pictures with "
                                        "(e.g. articleType)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run, args.out, args.n, args.compare, args.seed,
                            args.neighbors, args.label)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
