"""Measure a run's quality: are the precomputed neighbours right, and the right kind?

``python -m pipeline.evaluate --run=RUN_DIR [--labels=MANIFEST --label_column=articleType]
[--k=10] [--sample=2000]`` prints and writes ``RUN_DIR/evaluation.json``:

- recall@k of the published neighbours against exact cosine search on the stored vectors
  (on a sample of products): does the index lose true neighbours?
- precision@k by a label column, both for exact search and for the published lists: the
  share of a product's k neighbours with the same label (articleType, category…) — the
  figure that says whether "looks like this" shows the same kind of product;
- coverage: the share of products with a full list;
- the distribution of top-1 and k-th similarities, and failed rows by reason.

``python -m pipeline.evaluate --compare RUN_A RUN_B … --labels=… --label_column=…`` prints one
row per run (model, dim, precision@k, recall@k, embed time) to answer "which embedding is
better for my catalogue?".
"""

from __future__ import annotations

import argparse
import glob as globlib
import json
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import files, publish, run_reader, similarity_search
from pipeline.catalog import ManifestRowReader, inspect_catalog
from pipeline.run_layout import EVALUATION_FILE, IDS_FILE, INDEX_DIR, SPACE_FILE, VECTORS_FILE


def read_labels(manifest: str, label_column: str, id_column: str = "product_id",
                image_column: str = "image", embedding_column: str | None = None
                ) -> dict[str, str]:
    """product id → label from a labelled manifest (rows without a label are skipped)."""
    info = inspect_catalog(manifest, id_column, image_column, embedding_column)
    carried = {name: out for name, out, _ in info.carried}
    if label_column not in carried:
        raise ValueError(f"{manifest} has no column {label_column!r}")
    labels = {}
    for row in ManifestRowReader(info).rows(manifest):
        value = row.extra.get(carried[label_column])
        if row.product_id and value not in (None, ""):
            labels[row.product_id] = str(value)
    return labels


def _precision(ids: list[str], neighbor_ids: list[list[str]], labels: dict, k: int):
    hits, total = 0, 0
    for pid, neighbors in zip(ids, neighbor_ids):
        label = labels.get(pid)
        if label is None:
            continue
        top = neighbors[:k]
        if not top:
            continue
        hits += sum(labels.get(n) == label for n in top)
        total += len(top)
    return round(hits / total, 4) if total else None


def _search_space(run_dir: str, matrix):
    """The run's search-space vectors (index/vectors.npy) when a quality recipe made them
    differ from the backbone vectors in features/: exact search and recall are then judged
    in the space the lists were made in. Unpartitioned runs only; otherwise ``matrix``."""
    import dataclasses

    import pyarrow.parquet as pq

    index = files.join(run_dir, INDEX_DIR)
    if not FileSystems.exists(files.join(index, SPACE_FILE)) or not FileSystems.exists(
            files.join(index, VECTORS_FILE)):
        return matrix
    with FileSystems.open(files.join(index, IDS_FILE)) as handle:
        ids = pq.read_table(handle).column("product_id").to_pylist()
    with FileSystems.open(files.join(index, VECTORS_FILE)) as handle:
        import io

        vectors = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    if ids != list(matrix.product_ids):
        return matrix
    return dataclasses.replace(matrix, vectors=vectors)


def _quantiles(values) -> dict:
    if not len(values):
        return {}
    qs = np.quantile(np.asarray(values, dtype=np.float64), [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {name: round(float(q), 4)
            for name, q in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), qs)}


def evaluate_run(run_dir: str, labels: dict | None = None, k: int = 10,
                 sample: int = 2000, seed: int = 0) -> dict:
    """Evaluation figures of one run (see the module docstring)."""
    run_dir = publish.resolve_run(run_dir)
    matrix = _search_space(run_dir, run_reader.read_features(run_dir))
    published = run_reader.read_neighbor_lists(run_dir)
    manifest = run_reader.read_manifest(run_dir) or {}
    top_k = manifest.get("top_k") or max((len(v) for v in published.values()), default=k)
    n = matrix.count
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if n else np.array([], int)
    exact_idx, exact_sims = similarity_search.exact_top_k(
        matrix.vectors[rows], matrix.vectors, top_k, query_rows=rows) if n > 1 else ([], [])
    ids = matrix.product_ids
    sample_ids = [ids[r] for r in rows]
    exact_lists = [[ids[j] for j in row] for row in exact_idx]
    published_lists = [[pid for pid, _ in published.get(pid, [])] for pid in sample_ids]
    recall_hits = sum(len(set(p[:top_k]) & set(e[:top_k]))
                      for p, e in zip(published_lists, exact_lists))
    recall_total = sum(len(e[:top_k]) for e in exact_lists)
    expected = min(top_k, max(0, n - 1))
    full = sum(1 for v in published.values() if len(v) >= expected)
    result = {
        "run": run_dir,
        "model": matrix.model_id,
        "dim": int(matrix.vectors.shape[1]) if n else 0,
        "products": n,
        "k": k,
        "top_k": top_k,
        "sample": len(rows),
        f"recall@{top_k}": round(recall_hits / recall_total, 4) if recall_total else None,
        "coverage": round(full / len(published), 4) if published else 0.0,
        "similarity": {
            "top1": _quantiles([v[0][1] for v in published.values() if v]),
            f"top{top_k}": _quantiles([v[-1][1] for v in published.values()
                                       if len(v) >= expected and v]),
        },
        "failed_by_reason": manifest.get("counts", {}).get("failed_by_reason", {}),
        "embed_wall_seconds": manifest.get("timings", {}).get("wall_seconds"),
        "quality": (manifest.get("quality") or {}).get("profile", "fast"),
    }
    if labels:
        result["labelled"] = sum(1 for pid in ids if pid in labels)
        result[f"precision@{k}_exact"] = _precision(sample_ids, exact_lists, labels, k)
        result[f"precision@{k}_published"] = _precision(sample_ids, published_lists, labels, k)
    return result


def comparison_table(results: list[dict], k: int, label_columns: tuple = ()) -> str:
    """One row per run: the numbers that decide which embedding or profile to use.

    Precision@k of the published lists for each label column, the search dimension,
    recall, and the wall time with its ratio to the first run's (cost)."""
    header = ["run", "quality", "model", "dim"]
    header += [f"P@{k} {c}" for c in label_columns] or [f"precision@{k}"]
    header += ["recall", "wall s", "cost"]
    rows = [header]
    base = results[0].get("embed_wall_seconds") if results else None
    for r in results:
        recall = next((v for key, v in r.items() if key.startswith("recall@")), None)
        wall = r.get("embed_wall_seconds")
        precision = ([str(r.get("by_label", {}).get(c, "-")) for c in label_columns]
                     or [str(r.get(f"precision@{k}_published", "-"))])
        rows.append([r["run"], str(r.get("quality", "fast")), str(r["model"]), str(r["dim"]),
                     *precision, str(recall), str(wall),
                     f"{wall / base:.2f}x" if wall and base else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    """Console entry: evaluate one run (and write evaluation.json) or compare several."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run output directory")
    parser.add_argument("--compare", nargs="+", help="several run directories")
    parser.add_argument("--labels", help="labelled manifest (e.g. catalog.csv)")
    parser.add_argument("--label_column", default="articleType",
                        help="label column; with --compare a comma-separated list "
                        "(e.g. articleType,subCategory) gives one precision column each")
    parser.add_argument("--id_column", default="product_id")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--embedding_column", default=None,
                        help="the labels manifest holds vectors in this column, not images")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--sample", type=int, default=2000)
    args = parser.parse_args(argv)
    if not args.run and not args.compare:
        parser.error("give --run or --compare")
    if args.compare:
        columns = tuple(c for c in args.label_column.split(",") if c) if args.labels else ()
        by_column = {c: read_labels(args.labels, c, args.id_column, args.image_column,
                                    args.embedding_column) for c in columns}
        runs = [run for pattern in args.compare for run in (sorted(globlib.glob(pattern))
                                                            or [pattern])]
        results = []
        for run in runs:
            result = evaluate_run(run, None, args.k, args.sample)
            result["by_label"] = {c: evaluate_run(run, labels, args.k, args.sample)[
                f"precision@{args.k}_published"] for c, labels in by_column.items()}
            results.append(result)
        print(comparison_table(results, args.k, columns))
        return 0
    labels = (read_labels(args.labels, args.label_column, args.id_column, args.image_column,
                          args.embedding_column)
              if args.labels else None)
    result = evaluate_run(args.run, labels, args.k, args.sample)
    if labels:
        result["label_column"] = args.label_column
    files.write_json(files.join(result["run"], EVALUATION_FILE), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
