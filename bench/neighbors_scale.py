"""Benchmark the top-k similarity search stage (exact, Annoy + re-rank, IVF) as N grows.

Usage::

    python bench/neighbors_scale.py [--sizes 20000,50000,100000,500000] [--dims 1280,256]
                                    [--k 20] [--queries 2000] [--methods exact,annoy,ivf]
                                    [--data catalog|clustered]

For each (N, D) it writes synthetic clustered unit vectors to a temporary
``.npy`` memmap and measures, each phase in its own subprocess so memory
peaks are separate:

* ``exact``: exact top-k for a random sample of Q = --queries rows (all
  rows when N <= Q), extrapolated linearly to all N rows (exact cost per
  query is proportional to N, so total time ~ N^2); BLAS uses all cores;
* ``build``: Annoy index build with ``default_n_trees`` (single-threaded,
  for a deterministic file);
* ``annoy``: Annoy + exact re-rank top-k for the same sample on --threads
  threads (default: all cores), extrapolated to all N rows, with recall@k
  against the exact results of the sample. The sample pays the first-touch
  page faults of the memory-mapped index, so the extrapolation is on the
  pessimistic side.

* ``ivf``: the inverted-file all-kNN of ``pipeline/ivf.py`` over *all* N
  rows (not extrapolated): build = k-means on the sample + nprobe
  calibration, query = assignment + per-list search + merge; recall@k on
  the exact sample. Its memory columns: the in-process run's peaks, and
  ``worker`` = the Beam stage's largest per-worker group (members + queries
  of the biggest list, (1 + nprobe) N/nlist D 4 bytes on average) plus one
  tile of ``ivf.LIST_TILE_ENTRIES`` floats.

Peak memory per phase is reported as the peak anonymous RSS (sampled from
/proc/self/status every 20 ms: private heap, excludes memory-mapped file
pages that the OS page cache can share and evict) and the peak RSS (VmHWM,
includes mapped file pages touched). Then it prints a table, per D and
method the log-log slope of total time against N, and where exact and
Annoy cross.

The synthetic data (``--data``) are by default catalogue-structured
(``bench/catalog_vectors.py``: categories → product types → models →
variants, Zipf-like group sizes, a decaying spectrum), the structure that
sets IVF's ``nprobe``. ``--data clustered`` gives the older hierarchical clusters, like product categories and
sub-categories: ``N // 2500`` (4..400) category centres, 10 sub-centres per
category (cosine ~0.7 to their category), points at cosine ~0.55-0.9 to
their sub-centre (isotropic noise of norm 0.5-1.5 relative to the unit
centre); sub-category sizes are log-normal (sigma 1), so some products have
fewer than k same-sub-category neighbours. Same-sub-category products are
at cosine ~0.5, same-category ~0.25, others ~0.

The defaults take ~5 minutes on 2 cores. ``--sizes 1000000`` is opt-in:
~10 GB of disk (vectors + index) and ~13 minutes for both dims (mostly the
single-threaded Annoy builds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import similarity_search as ss  # noqa: E402

_SUBS_PER_CATEGORY = 10
_NOISE = 1.0  # noise norm relative to a unit centre: cosine 1/sqrt(2) ~ 0.71


def n_categories(n: int) -> int:
    """Number of top-level cluster centres for ``n`` synthetic points (~2,500 points each)."""
    return int(min(400, max(4, n // 2500)))


def make_clustered(path: str, n: int, dim: int, seed: int) -> None:
    """Write ``n`` clustered unit vectors of dimension ``dim`` to a float32 ``.npy`` at ``path``.

    Generated in chunks straight into a memmap so 1M x 1280 (5 GB) never
    needs to be held in memory; deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    cats = _unit(rng.standard_normal((n_categories(n), dim), dtype=np.float32))
    subs = np.repeat(cats, _SUBS_PER_CATEGORY, axis=0)
    subs = _unit(subs + _NOISE * _unit(rng.standard_normal(subs.shape, dtype=np.float32)))
    # Uneven sub-category sizes (log-normal weights, ~10x spread) so some
    # products have fewer than k same-sub-category neighbours, and uneven
    # per-point noise, so the k-th neighbour is not behind a clean gap.
    weights = rng.lognormal(0.0, 1.0, size=len(subs))
    weights /= weights.sum()
    out = ss.create_vectors(path, n, dim)
    chunk = max(1, (32 * 2**20) // (4 * dim))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.choice(len(subs), size=m, p=weights)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        noise *= (_NOISE / math.sqrt(dim)) * rng.uniform(0.5, 1.5, size=(m, 1)).astype(np.float32)
        out[start : start + m] = _unit(subs[labels] + noise)
    out.flush()
    del out


def make_catalog(path: str, n: int, dim: int, seed: int) -> None:
    """Write ``n`` catalogue-structured unit vectors (bench/catalog_vectors.py) to ``path``.

    Categories → product types → models → variants, Zipf-like group sizes
    and a decaying spectrum: a product's top-20 spreads over several models
    and types, the structure that sets the IVF ``nprobe``.
    """
    from bench.catalog_vectors import catalog_vectors

    out = ss.create_vectors(path, n, dim)
    catalog_vectors(n, dim, seed, out=out)
    out.flush()
    del out


_DATA = {"catalog": make_catalog, "clustered": make_clustered}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class _PeakMemory:
    """Samples this process's anonymous RSS in a background thread and keeps the peak."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.peak_anon = max(self.peak_anon, int(line.split()[1]) * 1024)
                    break


def _phase_exact(args) -> dict:
    vectors = ss.load_vectors(args.vectors)
    rows = np.load(args.rows, allow_pickle=False)
    with _PeakMemory() as mem:
        t0 = time.perf_counter()
        idx, sims = ss.exact_top_k(np.asarray(vectors[rows]), vectors, args.k, query_rows=rows)
        seconds = time.perf_counter() - t0
    np.save(args.result, idx, allow_pickle=False)
    np.save(args.result + ".sims.npy", sims, allow_pickle=False)
    return {"seconds": seconds, "peak_anon": mem.peak_anon, "maxrss": _maxrss()}


def _phase_build(args) -> dict:
    vectors = ss.load_vectors(args.vectors)
    with _PeakMemory() as mem:
        t0 = time.perf_counter()
        ss.build_annoy_index(vectors, args.index, args.n_trees, seed=0)
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_anon": mem.peak_anon,
        "maxrss": _maxrss(),
        "bytes": os.path.getsize(args.index),
    }


def _phase_annoy(args) -> dict:
    vectors = ss.load_vectors(args.vectors)
    rows = np.load(args.rows, allow_pickle=False)
    index = ss.open_annoy_index(args.index, vectors.shape[1])
    chunks = np.array_split(rows, max(1, min(len(rows), 8 * args.threads)))
    search_k = args.search_k or None
    candidates = args.candidates or None

    def run(chunk):
        return ss.annoy_top_k(index, vectors, chunk, args.k, candidates, search_k)

    with _PeakMemory() as mem:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            parts = list(pool.map(run, chunks))
        seconds = time.perf_counter() - t0
    np.save(args.result, np.concatenate([p[0] for p in parts]), allow_pickle=False)
    return {"seconds": seconds, "peak_anon": mem.peak_anon, "maxrss": _maxrss()}


def _maxrss() -> int:
    """Peak resident set size of this process in bytes (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries that over exec from the
    parent, which holds the freshly written vectors mapped.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _phase_ivf(args) -> dict:
    from pipeline import ivf

    vectors = ss.load_vectors(args.vectors)
    rows = np.load(args.rows, allow_pickle=False)
    with _PeakMemory() as mem:
        t0 = time.perf_counter()
        idx, sims, info = ivf.ivf_all_knn(vectors, args.k, args.nlist, args.nprobe)
        seconds = time.perf_counter() - t0
    np.save(args.result, sims[rows], allow_pickle=False)
    info["coverage"] = {str(p): c for p, c in info["coverage"].items()}
    return {"seconds": seconds, "peak_anon": mem.peak_anon, "maxrss": _maxrss(), "info": info}


_PHASES = {"exact": _phase_exact, "build": _phase_build, "annoy": _phase_annoy,
           "ivf": _phase_ivf}


def _run_phase(phase: str, **kwargs) -> dict:
    """Run one phase in a fresh interpreter so its memory peaks are its own; return its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true neighbours that ``found`` contains."""
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return hits / max(truth.size, 1)


def bench_one(n: int, dim: int, args, workdir: str) -> list[dict]:
    """Measure exact and Annoy search for one (N, D); return one table row per method."""
    vec_path = os.path.join(workdir, f"v_{n}_{dim}.npy")
    t0 = time.perf_counter()
    _DATA[args.data](vec_path, n, dim, seed=n + dim)
    gen_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    q = min(args.queries, n)
    rows = np.sort(rng.choice(n, size=q, replace=False)).astype(np.int64)
    rows_path = os.path.join(workdir, "rows.npy")
    np.save(rows_path, rows, allow_pickle=False)
    scale = n / q
    common = {"vectors": vec_path, "rows": rows_path, "k": args.k}

    from bench.cpu_steal import StealMeter

    with StealMeter() as exact_steal:
        exact = _run_phase("exact", result=os.path.join(workdir, "exact.npy"), **common)
    truth = np.load(os.path.join(workdir, "exact.npy"))
    truth_sims = np.load(os.path.join(workdir, "exact.npy.sims.npy"))
    base = {"N": n, "D": dim, "Q": q, "extrapolated": q < n, "gen_s": gen_s}
    out = [dict(base, method="exact", build_s=0.0, query_s=exact["seconds"] * scale,
                total_s=exact["seconds"] * scale, recall=1.0, build_anon=None,
                build_maxrss=None, query_anon=exact["peak_anon"], query_maxrss=exact["maxrss"],
                params="", steal=exact_steal.steal)]
    if "annoy" in args.methods:
        out.append(_bench_annoy(n, dim, args, workdir, vec_path, common, truth, scale, base))
    if "ivf" in args.methods:
        from bench.cpu_steal import StealMeter
        from pipeline import ivf

        with StealMeter() as meter:
            res = _run_phase("ivf", result=os.path.join(workdir, "ivf.npy"),
                             nlist=args.nlist, nprobe=args.nprobe, **common)
        info = res["info"]
        found_sims = np.load(os.path.join(workdir, "ivf.npy"))
        kk = truth_sims.shape[1]
        rec = float((found_sims[:, :kk] >= truth_sims[:, -1:] - 1e-6).mean())
        build_s = info["train_seconds"]
        worker = info["largest_group"] * dim * 4 + ivf.LIST_TILE_ENTRIES * 4
        out.append(dict(base, method="ivf", build_s=build_s, query_s=res["seconds"] - build_s,
                        total_s=res["seconds"], recall=rec, build_anon=None,
                        build_maxrss=None, query_anon=res["peak_anon"],
                        query_maxrss=res["maxrss"], extrapolated=False, steal=meter.steal,
                        params=f"nlist={info['nlist']} nprobe={info['nprobe']} "
                        f"kmeans={info['kmeans_seconds']:.1f}s "
                        f"calib={info['calibrate_seconds']:.1f}s "
                        f"assign={info['assign_seconds']:.1f}s "
                        f"passes={'/'.join(str(p) for p in info['pass_seconds'])}s "
                        f"kept={info['survivors'] / max(info['similarities'], 1):.2%} "
                        f"largest_list={info['largest_list']} "
                        f"worker={worker / 2**20:.0f}MiB load1={os.getloadavg()[0]:.1f}"))
    os.remove(vec_path)
    return out


def _bench_annoy(n, dim, args, workdir, vec_path, common, truth, scale, base):
    n_trees = args.n_trees or ss.default_n_trees(n, dim)
    index_path = os.path.join(workdir, "index.ann")
    build = _run_phase("build", index=index_path, n_trees=n_trees, vectors=vec_path)
    annoy = _run_phase(
        "annoy",
        index=index_path,
        result=os.path.join(workdir, "annoy.npy"),
        threads=args.threads,
        search_k=args.search_k,
        candidates=args.candidates,
        **common,
    )
    found = np.load(os.path.join(workdir, "annoy.npy"))
    search_k = args.search_k or ss.default_search_k(
        n_trees, args.candidates or ss.default_candidates(args.k)
    )
    os.remove(index_path)
    return dict(
        base,
        method="annoy",
        build_s=build["seconds"],
        query_s=annoy["seconds"] * scale,
        total_s=build["seconds"] + annoy["seconds"] * scale,
        recall=recall(found, truth),
        build_anon=build["peak_anon"],
        build_maxrss=build["maxrss"],
        query_anon=annoy["peak_anon"],
        query_maxrss=annoy["maxrss"],
        params=f"trees={n_trees} search_k={search_k} index={build['bytes'] / 2**20:.0f}MiB",
        steal=None,
    )


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def print_table(results: list[dict], k: int) -> None:
    """Print the results table and the fitted growth exponent of total time vs N."""
    print()
    print(
        f"{'N':>8} {'D':>5} {'method':>6} {'build_s':>8} {'query_s':>9} {'total_s':>9} "
        f"{'recall@' + str(k):>9} {'bld_anon':>8} {'bld_rss':>8} {'qry_anon':>8} {'qry_rss':>8} "
        f"{'steal':>5}  params"
    )
    for r in results:
        star = "*" if r["extrapolated"] else " "
        print(
            f"{r['N']:>8} {r['D']:>5} {r['method']:>6} {r['build_s']:>8.1f} {r['query_s']:>8.1f}{star} "
            f"{r['total_s']:>9.1f} {r['recall']:>9.4f} {_mib(r['build_anon']):>8} "
            f"{_mib(r['build_maxrss']):>8} {_mib(r['query_anon']):>8} {_mib(r['query_maxrss']):>8} "
            f"{'-' if r.get('steal') is None else format(100 * r['steal'], '.0f') + '%':>5}  "
            f"{r['params']}"
        )
    print(
        "* query time measured on a random sample of Q query rows and extrapolated "
        "linearly to all N rows.\nMemory in MiB: *_anon = peak anonymous RSS (sampled), "
        "*_rss = peak RSS (VmHWM, includes memory-mapped file pages touched). Both include\n"
        "the ~30-60 MiB of a Python interpreter with numpy loaded."
    )
    for dim in sorted({r["D"] for r in results}):
        totals = {}
        for method in ("exact", "annoy", "ivf"):
            pts = sorted((r["N"], r["total_s"]) for r in results if r["D"] == dim and r["method"] == method)
            totals[method] = pts
            if len(pts) >= 2:
                slope = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
                print(f"D={dim} {method}: total time ~ N^{slope:.2f} (log-log fit over N)")
        if totals["annoy"]:
            print(f"D={dim}: {crossover(totals['exact'], totals['annoy'])}")
        if totals["ivf"]:
            print(f"D={dim}: {crossover(totals['exact'], totals['ivf']).replace('annoy', 'ivf')}; "
                  + ", ".join(f"N={n}: exact/ivf {e / i:.1f}x" for (n, e), (_, i)
                              in zip(totals["exact"], totals["ivf"])))


def crossover(exact: list[tuple[int, float]], annoy: list[tuple[int, float]]) -> str:
    """Describe where exact total time overtakes Annoy's (log-log interpolation between sizes)."""
    pairs = [(n, e, a) for (n, e), (_, a) in zip(exact, annoy)]
    for (n0, e0, a0), (n1, e1, a1) in zip(pairs, pairs[1:]):
        if e0 <= a0 and e1 > a1:
            r0, r1 = math.log(e0 / a0), math.log(e1 / a1)
            n_cross = math.exp(math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1))
            return f"exact is faster up to N ~ {n_cross:,.0f}, annoy beyond"
    if pairs and all(e <= a for _, e, a in pairs):
        return "exact is faster at every measured N"
    if pairs and all(e > a for _, e, a in pairs):
        return "annoy is faster at every measured N"
    return "no single crossover in the measured sizes"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,50000,100000,500000")
    parser.add_argument("--dims", default="1280,256")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-trees", type=int, default=0, help="0 = default_n_trees")
    parser.add_argument("--search-k", type=int, default=0, help="0 = default_search_k")
    parser.add_argument("--candidates", type=int, default=0, help="0 = default_candidates")
    parser.add_argument("--workdir", default=None, help="temp dir for vectors and index")
    parser.add_argument("--methods", default="exact,annoy,ivf",
                        help="comma list of annoy, ivf (exact always runs: it is the truth)")
    parser.add_argument("--data", choices=sorted(_DATA), default="catalog",
                        help="synthetic vectors: catalog (bench/catalog_vectors.py, default) "
                        "or clustered (hierarchical isotropic clusters)")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists, 0 = default_nlist")
    parser.add_argument("--nprobe", type=int, default=0, help="IVF nprobe, 0 = calibrated")
    # Internal: run one phase (used by the subprocesses).
    parser.add_argument("--phase", choices=sorted(_PHASES), help=argparse.SUPPRESS)
    for name in ("vectors", "rows", "index", "result"):  # noqa: B007
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        print(json.dumps(_PHASES[args.phase](args)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for dim in dims:
            for n in sizes:
                rows = bench_one(n, dim, args, workdir)
                results += rows
                for r in rows:
                    print(
                        f"N={n} D={dim} {r['method']}: build {r['build_s']:.1f}s "
                        f"query {r['query_s']:.1f}s recall {r['recall']:.4f} {r['params']}",
                        flush=True,
                    )
    print_table(results, args.k)
    print(f"benchmark wall time {time.perf_counter() - started:.0f}s, threads={args.threads}, "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
