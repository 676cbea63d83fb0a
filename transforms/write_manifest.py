"""Write ``manifest.json`` last: what the run read, made, lost, and how long it took.

It is written only after the neighbour shards exist (they are side inputs of
this step) and only if the books balance: every input row is either a feature
row or an error row, and every feature row has a neighbour line. A run whose
counts don't add up fails here instead of publishing a quietly incomplete
result, so the presence of ``manifest.json`` means the output is complete.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import apache_beam as beam

from pipeline import files
from pipeline.index_description import IndexDescription
from pipeline.run_layout import MANIFEST_FILE
from transforms.count_rows import EMBEDDED, INPUT, REMOVED, REUSED, RunCounts


class IncompleteRunError(RuntimeError):
    """The run's counts do not add up; no manifest is written."""


def index_summary(indexes: list[IndexDescription]) -> dict:
    """The index settings of a run: one entry, or per-partition figures when partitioned."""
    biggest = max(indexes, key=lambda i: i.count)
    summary = {k: getattr(biggest, k) for k in ("dim", "metric", "n_trees", "search_k",
                                                "candidates", "search", "seed")}
    summary["count"] = sum(i.count for i in indexes)
    if len(indexes) > 1 or indexes[0].partition is not None:
        summary["partitions"] = {str(i.partition): {k: getattr(i, k) for k in (
            "count", "search", "n_trees")} for i in indexes}
    return summary


def recall_estimate(settings: dict, shards: list) -> dict:
    """The run's recall@k estimate from the shards' sampled products.

    Exact indexes are exact by construction (recall 1.0, nothing sampled);
    Annoy and IVF shards measured their share of the recall sample against
    exact search (see ``transforms.neighbor_shards.recall_hits``).
    """
    target = settings.get("recall_target", 0.99)
    wanted = sum(s.get("recall_wanted", 0) for s in shards)
    hits = sum(s.get("recall_hits", 0) for s in shards)
    approximate = any(s.get("search") in ("ivf", "annoy") for s in shards)
    k = settings.get("top_k")
    if not approximate:
        return {"recall": 1.0, "k": k, "sampled": 0, "target": target, "below_target": False,
                "method": "exact search"}
    recall = hits / wanted if wanted else None
    return {"recall": None if recall is None else round(recall, 4), "k": k,
            "sampled": sum(s.get("recall_sampled", 0) for s in shards),
            "neighbours_checked": wanted, "target": target,
            "below_target": recall is not None and recall < target,
            "method": "published lists of sampled products against exact search"}


def build_manifest(settings: dict, counts: RunCounts, index: list[IndexDescription] | None,
                   shards: list, started_at: float) -> dict:
    """The manifest document, after checking that no row went missing."""
    input_count, embedded = counts[INPUT], counts[EMBEDDED]
    reused, removed, failures = counts[REUSED], counts[REMOVED], counts.failures()
    by_stage: Counter = Counter()
    by_reason: Counter = Counter()
    for (stage, reason), count in failures:
        by_stage[stage] += count
        by_reason[f"{stage}:{reason}"] += count
    failed = sum(by_stage.values())
    if embedded + failed != input_count:
        raise IncompleteRunError(
            f"{input_count} input rows but {embedded} embedded + {failed} failed; refusing to "
            f"publish an output that lost rows")
    neighbor_rows = sum(s["rows"] for s in shards)
    indexed = sum(i.count for i in index) if index is not None else None
    if index is not None and (neighbor_rows != embedded or indexed != embedded):
        raise IncompleteRunError(
            f"{embedded} products embedded but the index holds {indexed} and "
            f"{neighbor_rows} neighbour lines were written")
    finished = time.time()
    wall = finished - started_at
    manifest = dict(
        settings,
        counts={
            "input": input_count,
            "embedded": embedded,
            "reused": reused,
            "newly_embedded": embedded - reused,
            "removed": removed,
            "failed": failed,
            "failed_by_stage": dict(sorted(by_stage.items())),
            "failed_by_reason": dict(sorted(by_reason.items())),
        },
        index=None if index is None else index_summary(index),
        neighbors={
            "products": neighbor_rows,
            "with_full_list": sum(s["full_lists"] for s in shards),
            "pairs": sum(s["pairs"] for s in shards),
            "shards": len(shards),
            "recall_estimate": recall_estimate(settings, shards),
        },
        timings={
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "wall_seconds": round(wall, 2),
            "index_build_seconds": index and round(sum(i.build_seconds for i in index), 3),
            "annoy_build_seconds": index and round(sum(
                0 if i.annoy_build_seconds is None else i.annoy_build_seconds
                for i in index), 3),
            "query_seconds_total": round(sum(s["seconds"] for s in shards), 2),
            "images_per_second": round(embedded / wall, 2) if wall > 0 else None,
        },
    )
    if manifest.get("index") is not None:
        ivf = [s for s in shards if s.get("search") == "ivf"]
        if ivf:
            manifest["index"]["search"] = "ivf" if len(ivf) == len(shards) else "mixed"
            manifest["index"]["nlist"] = max(s["nlist"] for s in ivf)
            manifest["index"]["nprobe"] = max(s["nprobe"] for s in ivf)
    if index is None:  # --features_only: no index and no neighbours in this run
        for key in ("index", "neighbors"):
            manifest.pop(key)
        for key in ("index_build_seconds", "annoy_build_seconds", "query_seconds_total"):
            manifest["timings"].pop(key)
    return manifest


class WriteManifest(beam.PTransform):
    """Write ``RUN_DIR/manifest.json`` once counts, index and neighbour shards are final."""

    def __init__(self, run_dir: str, settings: dict, started_at: float):
        super().__init__()
        self._path = files.join(run_dir, MANIFEST_FILE)
        self._settings = settings
        self._started_at = started_at

    def expand(self, inputs):
        """``(counts, index, shards, *after)``: the output of ``CountRows``, index and shard
        records, then any outputs (e.g. written file names) that must be final first."""
        counts, index, shards, *after = inputs
        path, settings, started_at = self._path, self._settings, self._started_at
        waits = {f"_after{i}": beam.pvalue.AsList(pcoll) for i, pcoll in enumerate(after)}

        def write(_, counts, index, shards, **_waits):
            manifest = build_manifest(settings, RunCounts(counts), index or None, shards,
                                      started_at)
            recall = manifest.get("neighbors", {}).get("recall_estimate", {})
            if recall.get("below_target"):
                message = (f"WARNING: estimated recall@{recall['k']} {recall['recall']:.4f} is "
                           f"below the target {recall['target']} ({recall['sampled']} sampled "
                           f"products); raise --nprobe or use --search=exact")
                logging.warning(message)
                print(message, file=sys.stderr)
            files.write_json(path, manifest)
            yield manifest

        return (counts.pipeline
                | "Once" >> beam.Impulse()
                | "Write" >> beam.FlatMap(
                    write,
                    counts=beam.pvalue.AsList(counts),
                    index=beam.pvalue.AsList(index),
                    shards=beam.pvalue.AsList(shards), **waits))
