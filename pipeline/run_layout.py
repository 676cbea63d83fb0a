"""Every directory and file name of an output root and of one run, in one place.

An output root and its runs look like this (``pipeline/publish.py`` moves ``LATEST``)::

    ROOT/LATEST                       one line: runs/<run_id> of the last good run
    ROOT/runs/<run_id>/INCOMPLETE     present until the run is verified and published
    ROOT/runs/<run_id>/manifest.json  written last: counts, settings, timings
    ROOT/runs/<run_id>/features/features-SSSSS-of-NNNNN.parquet   the feature contract
    ROOT/runs/<run_id>/errors/errors-SSSSS-of-NNNNN.jsonl         one line per failed row
    ROOT/runs/<run_id>/neighbors/neighbors-SSSSS-of-NNNNN.jsonl   top-k per product
    ROOT/runs/<run_id>/similar_products-SSSSS-of-NNNNN.jsonl      flat master/similar pairs
    ROOT/runs/<run_id>/duplicates/duplicates-00000-of-00001.jsonl near-duplicate groups
    ROOT/runs/<run_id>/index/         meta.json, ids.parquet, vectors.npy, annoy.ann, …
    ROOT/runs/<run_id>/evaluation.json, report.html               written by later tools

A plain module that imports nothing at load time (the query API opens an index without
importing Beam; the globs below join with ``files.join`` when called): the writers
(transforms/), the publisher, the run reader, the exporters and the query API all take
the names from here, so renaming a file is one edit and a reader can never look for a
name the writer does not use.
"""

from __future__ import annotations

# The output root.
RUNS_DIR = "runs"
LATEST = "LATEST"

# One run's directory.
INCOMPLETE = "INCOMPLETE"
MANIFEST_FILE = "manifest.json"
FEATURES_DIR = "features"
FEATURES_PREFIX = "features"  # shards: features-SSSSS-of-NNNNN.parquet
ERRORS_DIR = "errors"
ERRORS_PREFIX = "errors"  # shards: errors-SSSSS-of-NNNNN.jsonl
NEIGHBORS_DIR = "neighbors"
NEIGHBORS_PREFIX = "neighbors"  # shards: neighbors-SSSSS-of-NNNNN.jsonl
PAIRS_PREFIX = "similar_products"  # flat pairs at the run's top: similar_products-*.jsonl
DUPLICATES_DIR = "duplicates"
DUPLICATES_FILE = "duplicates-00000-of-00001.jsonl"
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.html"

# The run's index/ directory (one per partition under index/<partition>/ with --partition_by).
INDEX_DIR = "index"
ANNOY_FILE = "annoy.ann"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.parquet"
META_FILE = "meta.json"
PARTITIONS_FILE = "partitions.json"
PCA_MEAN_FILE = "pca_mean.npy"
PCA_COMPONENTS_FILE = "pca_components.npy"
# The quality recipe's search space (transforms/search_space.py).
SPACE_FILE = "space.json"
WHITENING_MEAN_FILE = "whitening_mean.npy"
WHITENING_PROJECTION_FILE = "whitening_projection.npy"
CENTROIDS_FILE = "ivf_centroids.npy"

# The output directory of a query-by-catalogue job (python -m pipeline.query --input=…).
QUERY_MANIFEST_FILE = "query_manifest.json"


def feature_shards(run_dir: str) -> str:
    """The glob of a run's feature shards (``features/*.parquet``)."""
    from pipeline.files import join

    return join(run_dir, FEATURES_DIR, "*.parquet")


def error_shards(run_dir: str) -> str:
    """The glob of a run's error shards (``errors/errors-*.jsonl``)."""
    from pipeline.files import join

    return join(run_dir, ERRORS_DIR, f"{ERRORS_PREFIX}-*.jsonl")


def neighbor_shards(run_dir: str) -> str:
    """The glob of a run's neighbour shards (``neighbors/neighbors-*.jsonl``)."""
    from pipeline.files import join

    return join(run_dir, NEIGHBORS_DIR, f"{NEIGHBORS_PREFIX}-*.jsonl")


def pair_shards(run_dir: str) -> str:
    """The glob of a run's flat pair shards (``similar_products-*.jsonl``)."""
    from pipeline.files import join

    return join(run_dir, f"{PAIRS_PREFIX}-*.jsonl")
