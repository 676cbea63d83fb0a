"""Read a run back from its output directory: manifest, features, neighbour lists, errors.

Evaluation, the report and the exporters each used to find a run's files their own
way; they read through these functions now, so the run layout
(:mod:`pipeline.run_layout`) and the feature contract (:mod:`pipeline.features`) are
the only things that know where a run keeps what. The functions work on any
``FileSystems`` path (local, gs://…) and never modify the run. Deciding whether a run
is complete enough for a given use (an exporter refuses one without a manifest, the
report shows it as incomplete) stays with the caller.
"""

from __future__ import annotations

import json
from typing import Iterator

from apache_beam.io.filesystems import FileSystems

from pipeline import files, run_layout
from pipeline.features import FeatureMatrix, feature_files, read_feature_matrix


def manifest_path(run_dir: str) -> str:
    """Where the run's ``manifest.json`` is (written last, only when the run finished)."""
    return files.join(run_dir, run_layout.MANIFEST_FILE)


def read_manifest(run_dir: str) -> dict | None:
    """The run's manifest, or None when it has none (still running, failed or interrupted)."""
    path = manifest_path(run_dir)
    return files.read_json(path) if FileSystems.exists(path) else None


def read_json_file(run_dir: str, name: str) -> dict | None:
    """A JSON file at the top of the run (``evaluation.json``…), or None when absent."""
    path = files.join(run_dir, name)
    return files.read_json(path) if FileSystems.exists(path) else None


def is_marked_incomplete(run_dir: str) -> bool:
    """Whether the run still carries its ``INCOMPLETE`` marker (not verified and published)."""
    return FileSystems.exists(files.join(run_dir, run_layout.INCOMPLETE))


def feature_paths(run_dir: str) -> list[str]:
    """The run's feature shards, sorted."""
    return feature_files(files.join(run_dir, run_layout.FEATURES_DIR))


def read_features(run_dir: str, extra_columns=()) -> FeatureMatrix:
    """All of the run's ids and embeddings (and ``extra_columns``), sorted by product id."""
    return read_feature_matrix(feature_paths(run_dir), extra_columns)


def neighbor_paths(run_dir: str) -> list[str]:
    """The run's neighbour shards, in name order (= product id ranges)."""
    found = FileSystems.match([run_layout.neighbor_shards(run_dir)])[0].metadata_list
    return sorted(m.path for m in found)


def read_neighbor_lists(run_dir: str) -> dict[str, list[tuple[str, float]]]:
    """The published neighbour lists of a run: product id → [(neighbour id, similarity)…]."""
    out = {}
    for path in neighbor_paths(run_dir):
        with FileSystems.open(path) as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    out[record["product_id"]] = [(n["product_id"], n["similarity"])
                                                 for n in record["neighbors"]]
    return out


def iter_error_records(run_dir: str) -> Iterator[dict]:
    """The run's error records as written (one per failed row), shard by shard in name order."""
    found = FileSystems.match([run_layout.error_shards(run_dir)])[0].metadata_list
    for match in sorted(found, key=lambda m: m.path):
        with FileSystems.open(match.path) as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
