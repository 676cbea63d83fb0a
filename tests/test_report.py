"""The HTML report of a run: self-contained, escaped, and rendered by a real browser."""

from __future__ import annotations

import base64
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from pipeline import publish, report
from pipeline.evaluate import main as evaluate_main
from pipeline.run import run
from tests.conftest import FAMILIES, export_tiny_model, write_catalog

SHOWN = 8
EVIL_LABEL = '<i>f0</i> & "zero"'
VANISHED = "p05-2"  # its image file is deleted after the runs
N_PRODUCTS = len(FAMILIES) * 3
ARTIFACTS = "/tmp/report-artifacts"
IMG_SRC = re.compile(r'<img [^>]*src="([^"]*)"')


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """Two real runs (two models) of one generated catalogue, then one image deleted."""
    base = tmp_path_factory.mktemp("report")
    manifest = write_catalog(base / "catalog", bad={"broken": b"<html>gone</html>"})
    with open(manifest) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["family"] = EVIL_LABEL if row["family"] == "f0" else row["family"]
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    other_model = export_tiny_model(str(base / "other_model"), dim=12)
    out_a, out_b = str(base / "run_a"), str(base / "run_b")
    for model, out in ((tiny_model, out_a), (other_model, out_b)):
        run([f"--input={manifest}", f"--output={out}", f"--model={model}", "--top_k=10"])
    assert evaluate_main(["--run", out_a, "--labels", str(manifest),
                          "--label_column", "family"]) == 0
    os.remove(base / "catalog" / "images" / f"{VANISHED}.jpg")
    return publish.resolve_run(out_a), publish.resolve_run(out_b)


def _neighbor_lists(run_dir):
    lists = {}
    for path in glob.glob(f"{run_dir}/neighbors/*.jsonl"):
        with open(path) as handle:
            for line in handle:
                record = json.loads(line)
                lists[record["product_id"]] = [n["product_id"] for n in record["neighbors"]]
    return lists


def _model(run_dir):
    with open(f"{run_dir}/manifest.json") as handle:
        return json.load(handle)["model"]


def _expected_slots(run_dirs):
    """(pictures, placeholders) when every product is shown with its top SHOWN neighbours."""
    slots = [pid for pid in _neighbor_lists(run_dirs[0])]  # query cards
    for run_dir in run_dirs:
        for neighbors in _neighbor_lists(run_dir).values():
            slots.extend(neighbors[:SHOWN])
    missing = sum(1 for pid in slots if pid == VANISHED)
    return len(slots) - missing, missing


@pytest.fixture(scope="module")
def compare_page(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("page") / "compare.html")
    assert report.main(["--run", runs[0], "--compare", runs[1], "--n=100", f"--out={out}",
                        "--label=family"]) == 0
    with open(out, encoding="utf-8") as handle:
        return out, handle.read()


def test_every_product_and_neighbour_gets_a_picture_or_a_placeholder(compare_page, runs):
    _, page = compare_page
    pictures, placeholders = _expected_slots(list(runs))
    assert pictures == N_PRODUCTS * (1 + 2 * SHOWN) - placeholders and placeholders >= 1
    assert len(IMG_SRC.findall(page)) == pictures
    assert page.count('class="ph"') == placeholders
    assert page.count("image missing") == placeholders


def test_thumbnails_are_intact_small_jpegs(compare_page):
    _, page = compare_page
    for src in set(IMG_SRC.findall(page)):
        assert src.startswith("data:image/jpeg;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        picture.load()
        assert picture.format == "JPEG" and picture.size == (report.THUMBNAIL_SIZE,) * 2


def test_page_references_nothing_outside_itself(compare_page):
    _, page = compare_page
    assert "http://" not in page and "https://" not in page
    references = re.findall(r'(?:src|href|action|srcset)\s*=\s*["\']?([^"\'\s>]*)', page)
    assert references and all(ref.startswith("data:") for ref in references)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert f'content="{report.CSP}"' in page


def test_summary_shows_both_runs_counts_failures_and_evaluation(compare_page, runs):
    _, page = compare_page
    model_a, model_b = _model(runs[0]), _model(runs[1])
    assert model_a != model_b
    assert f"<th>{model_a}</th><th>{model_b}</th>" in page  # grid column headers
    assert "decode:not_an_image" in page and "broken" in page
    assert "recall@10" in page and "precision@10_exact" in page
    assert page.count("<svg") == 2


def test_text_from_the_catalogue_is_escaped(compare_page):
    _, page = compare_page
    assert "<i>f0" not in page
    assert "&lt;i&gt;f0&lt;/i&gt; &amp; &quot;zero&quot;" in page


def test_sample_is_deterministic_by_seed(runs, tmp_path):
    pages = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        out = str(tmp_path / f"{name}.html")
        report.write_report(runs[0], out, n=5, seed=seed)
        with open(out, encoding="utf-8") as handle:
            pages.append(handle.read())
    assert pages[0] == pages[1] and pages[0] != pages[2]
    assert pages[0].count('class="card query"') == 5
    assert len(IMG_SRC.findall(pages[0])) + pages[0].count('class="ph"') == 5 * (1 + SHOWN)


def test_urls_are_never_fetched_and_broken_files_show_why(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    thumbs = report.Thumbnails()
    assert thumbs.get("https://shop.example/1.jpg") == (None, "URL (not fetched)")
    assert thumbs.get(str(tmp_path / "nope.jpg")) == (None, "image missing")
    assert thumbs.get(str(tmp_path / "bad.jpg")) == (None, "cannot decode (not_an_image)")


def test_a_run_without_neighbours_still_reports(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs[0], copy)
    shutil.rmtree(copy / "neighbors")
    path = report.write_report(str(copy), n=3)
    with open(path, encoding="utf-8") as handle:
        page = handle.read()
    assert path == str(copy / "report.html")
    assert page.count(">no neighbour list<") == 3 and "no neighbour lists in this run" in page


def test_an_output_root_reports_its_latest_run(runs, tmp_path):
    root = os.path.dirname(os.path.dirname(runs[0]))
    assert os.path.basename(os.path.dirname(runs[0])) == publish.RUNS_DIR
    path = report.write_report(root, n=2)
    assert path == os.path.join(runs[0], report.REPORT_FILE)
    with open(path, encoding="utf-8") as handle:
        assert _model(runs[0]) in handle.read()


def test_not_a_run_directory_is_one_sentence(tmp_path, capsys):
    assert report.main(["--run", str(tmp_path)]) == 2
    assert "not a run output directory" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PROBE = ("<script>addEventListener('load',()=>{const i=[...document.images];"
          "document.body.dataset.total=i.length;"
          "document.body.dataset.loaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});"
          "</script>")


def _chromium(tmp_path, url, *args):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--window-size=1280,2000", *args, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(Debian: apt-get install chromium); the browser rendering test is skipped")
def test_report_renders_in_headless_chromium(compare_page, runs, tmp_path):
    path, page = compare_page
    pictures, _ = _expected_slots(list(runs))
    screenshot = tmp_path / "report.png"
    _chromium(tmp_path, f"file://{path}", f"--screenshot={screenshot}")
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copy(screenshot, os.path.join(ARTIFACTS, "report.png"))
    shutil.copy(path, os.path.join(ARTIFACTS, "report.html"))
    shot = Image.open(screenshot).convert("RGB")
    assert shot.size == (1280, 2000)
    assert len(shot.getcolors(1 << 20) or range(1 << 20)) > 50  # pictures, not a blank page

    # The same page plus a probe counting decoded pictures; the policy is
    # loosened only in this copy, only to let the probe run.
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace(report.CSP, report.CSP + "; script-src 'unsafe-inline'")
                      .replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, f"file://{probed}", "--dump-dom", "--virtual-time-budget=10000")
    assert "sample products, top 8 neighbours" in dom
    assert re.search(r'data-total="(\d+)"', dom).group(1) == str(pictures)
    assert re.search(r'data-loaded="(\d+)"', dom).group(1) == str(pictures)
