"""Fetch the shared product catalogue over HTTP, with faulty image hosts mixed in.

Usage::

    python bench/fetch_faults.py [--products ../shared/data/products] [--fault_rate 0.05]
                                 [--workers 2] [--limit N] [--fetch_timeout 5]
                                 [--fetch_retries 2] [--no_raw_pixels] [--keep]

It serves the products' images from a local threaded HTTP server on
127.0.0.1 (own process, TCP_NODELAY, keep-alive) and writes two URL
manifests of every product: one all healthy, one where ``--fault_rate`` of
the URLs (a seeded choice) point at misbehaving endpoints of mixed kinds:
404, 500 forever, a connection that never answers, headers then silence, a
body trickling one byte at a time, a redirect loop, HTML served as
image/jpeg, a truncated JPEG, an endless body, a connection reset and a body
cut off before its Content-Length. Then it runs the pipeline
(``pipeline.run.run``, DirectRunner, ``--direct_num_workers=W
--direct_running_mode=multi_processing --allow_private_hosts``):

(a) the catalogue as is, from local files, default model;
(b) the healthy URL manifest, default model;
(c) the faulty URL manifest, default model;

and, unless ``--no_raw_pixels``, (b) and (c) again with ``--model=raw_pixels_32``,
a model that costs almost nothing, so those runs' images/s is bound by
fetching and decoding. It also times the fetcher alone (``HttpFetcher``, W
processes × the pipeline's 32 threads, no Beam, no decoding) on both URL lists.

It prints the throughputs and checks that (c) completed, that every faulty
URL is exactly one error row with the reason its fault must give, that no
healthy row failed, that the healthy rows' embeddings equal those of (a)
(max abs difference and min cosine printed) and that the counts add up. The
exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import multiprocessing
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_steal import StealMeter  # noqa: E402

DEFAULT_PRODUCTS = REPO.parent / "shared" / "data" / "products"
SEED = 7
# How long a hanging/stalling/trickling endpoint keeps its connection before giving up.
SLOW_ENDPOINT_SECONDS = 300
TRICKLE_INTERVAL = 0.5

# Fault kind -> the (stage, reason) the pipeline must report for it.
FAULTS = {
    "http_404": ("read", "http_404"),
    "http_500": ("read", "http_500"),
    "hang": ("read", "timeout"),  # request accepted, no response ever
    "stall": ("read", "timeout"),  # headers, then silence
    "trickle": ("read", "timeout"),  # one byte every TRICKLE_INTERVAL s, never done
    "redirect_loop": ("read", "too_many_redirects"),
    "html_as_jpeg": ("decode", "not_an_image"),
    "truncated_jpeg": ("decode", "truncated"),
    "endless": ("read", "too_large"),
    "reset": ("read", "connection_error"),
    "cut_off": ("read", "connection_error"),  # Content-Length promised, half sent, closed
}

HTML = (b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
        b"<body><h1>Please sign in to view this image</h1></body></html>")


# --- the image server (its own process) ----------------------------------------------


class _ImageHandler(BaseHTTPRequestHandler):
    """Serves ``/img/<path>`` from the products folder and ``/fault/<kind>/<path>``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms delayed-ACK stalls per response
    server: "_ImageServer"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        path = unquote(self.path.split("?", 1)[0])
        parts = path.lstrip("/").split("/", 2)
        try:
            if parts[0] == "stats":
                self._send(200, json.dumps(self.server.stats()).encode(), "application/json")
            elif parts[0] == "img" and len(parts) >= 2:
                self.server.count("img")
                self._image("/".join(parts[1:]))
            elif parts[0] == "fault" and len(parts) == 3 and parts[1] in FAULTS:
                self.server.count(parts[1])
                getattr(self, f"_fault_{parts[1]}")(parts[2])
            else:
                self._send(404, b"no such route", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up, as intended for slow faults

    def _file(self, relative: str) -> bytes | None:
        root = self.server.root
        target = (root / relative).resolve()
        if root not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, relative: str) -> None:
        data = self._file(relative)
        if data is None:
            self._send(404, b"not found", "text/plain")
        else:
            self._send(200, data)

    def _wait(self) -> None:
        self.server.stopping.wait(SLOW_ENDPOINT_SECONDS)
        self.close_connection = True

    def _fault_http_404(self, relative):
        self._send(404, b"<html><body>404 Not Found</body></html>", "text/html")

    def _fault_http_500(self, relative):
        self._send(500, b"internal server error", "text/plain")

    def _fault_hang(self, relative):
        self._wait()

    def _fault_stall(self, relative):
        data = self._file(relative) or b""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        self._wait()

    def _fault_trickle(self, relative):
        data = self._file(relative) or b"\xff" * 10_000
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        stop = time.monotonic() + SLOW_ENDPOINT_SECONDS
        for i in range(len(data)):
            if time.monotonic() > stop or self.server.stopping.is_set():
                break
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(TRICKLE_INTERVAL)
        self.close_connection = True

    def _fault_redirect_loop(self, relative):
        hop = int(self.path.split("?hop=", 1)[1]) + 1 if "?hop=" in self.path else 1
        self.send_response(302)
        self.send_header("Location", f"/fault/redirect_loop/{relative}?hop={hop}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _fault_html_as_jpeg(self, relative):
        self._send(200, HTML, "image/jpeg")

    def _fault_truncated_jpeg(self, relative):
        data = self._file(relative) or b""
        self._send(200, data[: len(data) // 2])

    def _fault_endless(self, relative):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        block = b"\xff\xd8" + b"\x00" * 65534
        stop = time.monotonic() + SLOW_ENDPOINT_SECONDS
        while time.monotonic() < stop and not self.server.stopping.is_set():
            self.wfile.write(block)
        self.close_connection = True

    def _fault_reset(self, relative):
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _fault_cut_off(self, relative):
        data = self._file(relative) or b"\xff" * 10_000
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 2 workers × 32 connections may open at once

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _ImageHandler)
        self.root = root.resolve()
        self.stopping = threading.Event()
        self._hits: Counter = Counter()
        self._lock = threading.Lock()

    def count(self, key: str) -> None:
        with self._lock:
            self._hits[key] += 1

    def stats(self) -> dict:
        with self._lock:
            return dict(self._hits)


def _serve(root: str, port_pipe) -> None:
    """Child process: serve ``root`` until terminated; send the port back first."""
    server = _ImageServer(Path(root))
    port_pipe.send(server.server_address[1])
    port_pipe.close()
    server.serve_forever(poll_interval=0.1)


def start_server(root: Path):
    """Start the image server in its own process; return (process, base URL)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_serve, args=(str(root), child), daemon=True)
    process.start()
    port = parent.recv()
    return process, f"http://127.0.0.1:{port}"


def server_stats(base: str) -> dict:
    """Requests the server has answered so far, by route kind."""
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
        return json.loads(response.read())


# --- the fetcher alone (no Beam) ------------------------------------------------------


def _fetch_share(urls: list, threads: int, timeout: float, retries: int) -> dict:
    """Child process: fetch ``urls`` with one HttpFetcher and a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.http_fetch import FetchConfig, FetchError, HttpFetcher

    fetcher = HttpFetcher(FetchConfig(read_timeout=timeout, max_retries=retries,
                                      allow_private_hosts=True, concurrency=threads))

    def one(url):
        try:
            return "ok", len(fetcher.fetch(url).data)
        except FetchError as exc:
            return exc.reason, 0

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, urls))
    fetcher.close()
    return {"seconds": time.monotonic() - started,
            "outcomes": Counter(r for r, _ in results), "bytes": sum(n for _, n in results)}


def measure_fetcher(urls: list, processes: int, threads: int, timeout: float,
                    retries: int) -> dict:
    """Fetch ``urls`` split over ``processes`` processes; return the rate and outcomes."""
    ctx = multiprocessing.get_context("spawn")
    shares = [urls[i::processes] for i in range(processes)]
    with ctx.Pool(processes) as pool:
        started = time.monotonic()
        parts = pool.starmap(_fetch_share, [(s, threads, timeout, retries) for s in shares])
        wall = time.monotonic() - started
    outcomes = sum((p["outcomes"] for p in parts), Counter())
    return {"urls": len(urls), "seconds": wall, "rate": len(urls) / wall,
            "ok": outcomes.get("ok", 0), "outcomes": dict(outcomes),
            "mb": sum(p["bytes"] for p in parts) / 1e6}


# --- manifests ------------------------------------------------------------------------


def read_catalogue(products: Path, limit: int | None) -> list[dict]:
    """The catalogue rows (product_id, image relative to ``products``), first ``limit``."""
    with open(products / "catalog.csv", newline="", encoding="utf-8") as handle:
        rows = [{"product_id": r["product_id"], "image": r["image"]} for r in csv.DictReader(handle)]
    return rows[:limit] if limit else rows


def choose_faults(ids: list[str], rate: float, seed: int) -> dict[str, str]:
    """A seeded ``rate`` share of ``ids`` mapped to fault kinds, mixed evenly."""
    rng = random.Random(seed)
    chosen = rng.sample(ids, round(rate * len(ids)))
    kinds = list(FAULTS)
    return {pid: kinds[i % len(kinds)] for i, pid in enumerate(chosen)}


def write_manifest(path: Path, rows: list[dict]) -> None:
    """A product_id,image CSV."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["product_id", "image"])
        writer.writeheader()
        writer.writerows(rows)


def url_rows(rows: list[dict], base: str, faults: dict[str, str]) -> list[dict]:
    """Rows whose image is a URL on the server; faulty ids get their fault's URL."""
    out = []
    for row in rows:
        kind = faults.get(row["product_id"])
        prefix = f"{base}/fault/{kind}" if kind else f"{base}/img"
        out.append({"product_id": row["product_id"], "image": f"{prefix}/{row['image']}"})
    return out


# --- pipeline runs and their outputs ---------------------------------------------------


def run_pipeline(catalogue: Path, out: Path, workers: int, extra: list[str]) -> tuple[dict, float]:
    """Run the job; return its manifest.json and the wall time around ``run``."""
    from pipeline.run import run

    argv = [f"--input={catalogue}", f"--output={out}", f"--direct_num_workers={workers}",
            "--direct_running_mode=multi_processing", "--allow_private_hosts",
            "--default_sdk_harness_log_level=WARNING", *extra]
    started = time.monotonic()
    manifest = run(argv)
    return manifest, time.monotonic() - started


def read_features(out: Path) -> dict:
    """product_id -> L2-normalised embedding (float64) of a finished run."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["product_id", "embedding"])
              for p in sorted(glob.glob(f"{out}/features/*.parquet"))]
    table = pa.concat_tables(tables)
    ids = table.column("product_id").to_pylist()
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float64)
    return dict(zip(ids, vectors))


def read_errors(out: Path) -> list[dict]:
    """Every error line of a finished run."""
    lines = []
    for path in sorted(glob.glob(f"{out}/errors/*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    return lines


def compare_embeddings(reference: dict, other: dict, ids: list[str]) -> dict:
    """Max abs difference and min cosine between two runs' vectors for ``ids``."""
    import numpy as np

    a = np.stack([reference[i] for i in ids])
    b = np.stack([other[i] for i in ids])
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cosine.min())}


class Checks:
    """Collects pass/fail lines; the script exits 1 if any failed."""

    def __init__(self):
        self.failed = 0

    def check(self, ok: bool, text: str) -> None:
        """Print one check line."""
        print(f"  [{'ok' if ok else 'FAIL'}] {text}")
        if not ok:
            self.failed += 1


# --- main -------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=Path, default=DEFAULT_PRODUCTS,
                        help="Folder with catalog.csv and images/ (default ../shared/data/products).")
    parser.add_argument("--fault_rate", type=float, default=0.05,
                        help="Share of URLs made faulty in run (c).")
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes.")
    parser.add_argument("--limit", type=int, default=None,
                        help="Use only the first N products (for quick trials).")
    parser.add_argument("--fetch_timeout", type=float, default=5.0,
                        help="--fetch_timeout of the URL runs (read timeout, seconds).")
    parser.add_argument("--fetch_retries", type=int, default=2,
                        help="--fetch_retries of the URL runs.")
    parser.add_argument("--seed", type=int, default=SEED, help="Seed of the fault choice.")
    parser.add_argument("--model", default=None,
                        help="Model of runs (a)-(c) (default: the pipeline's default model).")
    parser.add_argument("--no_raw_pixels", action="store_true",
                        help="Skip the raw_pixels_32 runs of (b) and (c).")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where manifests and outputs go (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    parser.add_argument("--fetcher_only", action="store_true",
                        help="Skip the pipeline runs: time the fetcher alone on both URL lists and "
                             "check each faulty URL's outcome (a bounded run for a busy machine).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the benchmark; return 0 when every check passed, else 1."""
    args = parse_args(argv)
    products = args.products.resolve()
    if not (products / "catalog.csv").is_file():
        print(f"error: {products}/catalog.csv not found (give --products)", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fetch-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    server, base = start_server(products)
    try:
        return _bench(args, products, work, base)
    finally:
        server.terminate()
        server.join(5)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args, products: Path, work: Path, base: str) -> int:
    rows = read_catalogue(products, args.limit)
    ids = [r["product_id"] for r in rows]
    faults = choose_faults(ids, args.fault_rate, args.seed)
    healthy_ids = [i for i in ids if i not in faults]
    n = len(rows)
    print(f"{n} products from {products}; {len(faults)} faulty URLs in (c) "
          f"({args.fault_rate:.1%}, seed {args.seed}): "
          + ", ".join(f"{k} {v}" for k, v in sorted(Counter(faults.values()).items())))
    print(f"server {base} (own process, ThreadingHTTPServer, TCP_NODELAY, keep-alive); "
          f"DirectRunner multi_processing × {args.workers}; URL runs: "
          f"--fetch_timeout={args.fetch_timeout:g} --fetch_retries={args.fetch_retries}; "
          f"{os.cpu_count()} CPU cores")

    if args.limit:
        local = work / "local.csv"
        write_manifest(local, [{"product_id": r["product_id"],
                                "image": str(products / r["image"])} for r in rows])
    else:
        local = products / "catalog.csv"
    healthy = work / "urls-healthy.csv"
    faulty = work / "urls-faulty.csv"
    write_manifest(healthy, url_rows(rows, base, {}))
    write_manifest(faulty, url_rows(rows, base, faults))

    fetch_opts = [f"--fetch_timeout={args.fetch_timeout}", f"--fetch_retries={args.fetch_retries}"]
    model_opts = [f"--model={args.model}"] if args.model else []
    runs = [("a", "local files", local, model_opts),
            ("b", "healthy URLs", healthy, model_opts + fetch_opts),
            ("c", "faulty URLs", faulty, model_opts + fetch_opts)]
    if not args.no_raw_pixels:
        raw = ["--model=raw_pixels_32"]
        runs += [("b-raw", "healthy URLs, raw_pixels_32", healthy, raw + fetch_opts),
                 ("c-raw", "faulty URLs, raw_pixels_32", faulty, raw + fetch_opts)]

    results = {}
    if args.fetcher_only:
        runs = []
    for key, label, catalogue, extra in runs:
        out = work / f"out-{key}"
        before = server_stats(base)
        print(f"\n({key}) {label}: running …", flush=True)
        try:
            manifest, seconds = run_pipeline(catalogue, out, args.workers, extra)
        except Exception as exc:  # noqa: BLE001 - a crashed run is a failed check, not the end
            print(f"({key}) the run FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            results[key] = {"crashed": f"{type(exc).__name__}: {exc}"}
            continue
        after = server_stats(base)
        requests = {k: after.get(k, 0) - before.get(k, 0) for k in after
                    if after.get(k, 0) != before.get(k, 0)}
        counts, timings = manifest["counts"], manifest["timings"]
        print(f"({key}) {manifest['model_name']}: {seconds:.1f} s around run(); manifest "
              f"wall {timings['wall_seconds']} s, {timings['images_per_second']} images/s "
              f"(embedded / wall); input {counts['input']}, embedded {counts['embedded']}, "
              f"failed {counts['failed']}")
        if counts["failed_by_reason"]:
            print(f"     failed_by_reason: {counts['failed_by_reason']}")
        if requests:
            print(f"     server requests: {requests}")
        results[key] = {"out": Path(manifest["run_dir"]), "manifest": manifest,
                        "seconds": seconds}

    print("\nfetcher alone (HttpFetcher, no Beam, no decode): "
          f"{args.workers} processes × 32 threads")
    fetcher_rates = {}
    for key, catalogue in (("b", healthy), ("c", faulty)):
        with open(catalogue, newline="") as handle:
            urls = [r["image"] for r in csv.DictReader(handle)]
        with StealMeter() as meter:
            m = measure_fetcher(urls, args.workers, 32, args.fetch_timeout, args.fetch_retries)
        fetcher_rates[key] = m
        print(f"  ({key}) {m['urls']} URLs in {m['seconds']:.1f} s = {m['rate']:.0f} URLs/s, "
              f"{m['mb']:.1f} MB; outcomes {m['outcomes']}{meter.label()}")

    return _verify(args, results, faults, healthy_ids, ids, fetcher_rates)


def _verify(args, results, faults, healthy_ids, ids, fetcher_rates) -> int:
    checks = Checks()
    n = len(ids)
    finished = {k: r for k, r in results.items() if "crashed" not in r}
    print("\nthroughput (images/s)")
    for key in ("b", "c", "b-raw", "c-raw"):
        if key in finished:
            m = finished[key]["manifest"]
            print(f"  ({key}) end-to-end, manifest.json: {m['timings']['images_per_second']}"
                  f"   ({m['model_name']})")
    for key, m in fetcher_rates.items():
        print(f"  ({key}) fetch stage alone (HttpFetcher): {m['rate']:.0f}")
    if "b" in fetcher_rates and "c" in fetcher_rates:
        print(f"  (c)/(b) fetch stage alone: {fetcher_rates['c']['rate'] / fetcher_rates['b']['rate']:.2f}")

    print("\nchecks")
    expected_fetch = Counter(FAULTS[k][1] for k in faults.values() if FAULTS[k][0] == "read")
    if "c" in fetcher_rates:
        outcomes = Counter(fetcher_rates["c"]["outcomes"])
        got = Counter({k: v for k, v in outcomes.items() if k != "ok"})
        checks.check(got == expected_fetch and outcomes["ok"] == n - sum(expected_fetch.values()),
                     f"(c) fetcher alone: each faulty URL gave its reason ({dict(got)})")
    if "b" in fetcher_rates:
        checks.check(fetcher_rates["b"]["outcomes"] == {"ok": n}, "(b) fetcher alone: every healthy URL fetched")
    for key, r in results.items():
        checks.check("crashed" not in r, f"({key}) completed and wrote manifest.json"
                     + (f"; it crashed: {r['crashed'][:200]}" if "crashed" in r else ""))
    ref = read_features(finished["a"]["out"]) if "a" in finished else None
    for key in ("a", "b", "b-raw"):
        if key not in finished:
            continue
        counts = finished[key]["manifest"]["counts"]
        checks.check(counts["input"] == n and counts["embedded"] == n and counts["failed"] == 0,
                     f"({key}) embedded all {n} images")
    if ref is not None and "b" in finished:
        diff = compare_embeddings(ref, read_features(finished["b"]["out"]), ids)
        checks.check(diff["max_abs_diff"] <= 1e-4 and diff["min_cosine"] >= 0.9999,
                     f"(b) embeddings equal (a): max abs diff {diff['max_abs_diff']:.2e}, "
                     f"min cosine {diff['min_cosine']:.7f}")

    expected_reasons = Counter(":".join(FAULTS[k]) for k in faults.values())
    for key in ("c", "c-raw"):
        if key in finished:
            _verify_faulty(checks, key, finished[key], faults, healthy_ids, n, expected_reasons,
                           ref if key == "c" else None)
    print(f"\n{'all checks passed' if not checks.failed else f'{checks.failed} check(s) FAILED'}")
    return 1 if checks.failed else 0


def _verify_faulty(checks, key, result, faults, healthy_ids, n, expected_reasons, ref) -> None:
    out, counts = result["out"], result["manifest"]["counts"]
    checks.check(counts["input"] == n and counts["embedded"] == len(healthy_ids)
                 and counts["failed"] == len(faults)
                 and counts["embedded"] + counts["failed"] == counts["input"],
                 f"({key}) counts add up: input {counts['input']} = embedded "
                 f"{counts['embedded']} + failed {counts['failed']}")
    checks.check(counts["failed_by_reason"] == dict(expected_reasons),
                 f"({key}) failed_by_reason matches the faults: {dict(expected_reasons)}")
    errors = read_errors(out)
    by_id: dict = {}
    for e in errors:
        by_id.setdefault(e["product_id"], []).append(e)
    wrong = []
    for pid, kind in faults.items():
        lines = by_id.get(pid, [])
        if len(lines) != 1 or (lines[0]["stage"], lines[0]["reason"]) != FAULTS[kind] \
                or not lines[0]["error"]:
            wrong.append((pid, kind, [(e["stage"], e["reason"]) for e in lines]))
    checks.check(not wrong, f"({key}) each of the {len(faults)} faulty URLs is exactly one "
                 f"error row with its reason" + (f"; wrong: {wrong[:5]}" if wrong else ""))
    stray = [pid for pid in by_id if pid not in faults]
    checks.check(not stray, f"({key}) no healthy row failed" +
                 (f"; failed: {stray[:5]}" if stray else ""))
    features = read_features(out)
    checks.check(set(features) == set(healthy_ids),
                 f"({key}) exactly the {len(healthy_ids)} healthy products were embedded")
    if ref is not None:
        diff = compare_embeddings(ref, features, healthy_ids)
        checks.check(diff["max_abs_diff"] <= 1e-4 and diff["min_cosine"] >= 0.9999,
                     f"({key}) healthy embeddings equal (a): max abs diff "
                     f"{diff['max_abs_diff']:.2e}, min cosine {diff['min_cosine']:.7f}")
        print("  one error message per fault kind:")
        for kind in FAULTS:
            example = next((by_id[p][0]["error"] for p, k in faults.items()
                            if k == kind and by_id.get(p)), None)
            if example:
                print(f"    {kind:>14}: {example[:150]}")


if __name__ == "__main__":
    sys.exit(main())
