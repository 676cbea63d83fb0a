"""The grouped run configuration (pipeline/run_config.py) and what it records in manifest.json."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.catalog import CatalogInfo
from pipeline.http_fetch import FetchConfig
from pipeline.models.registry import ResolvedModel
from pipeline.quality import PROFILES
from pipeline.run_config import ModelConfig, OutputConfig, RunConfig, RunnerConfig, SearchConfig

# manifest.json's settings keys, in the order users and tests read them.
MANIFEST_SETTINGS_KEYS = [
    "input", "output", "run_id", "run_dir", "previous_run", "reuse", "catalog_kind",
    "embedding_column", "model", "model_name", "dim", "input_size", "engine", "batch_size",
    "model_threads", "model_lanes", "top_k", "seed", "partition_by", "exclude_same",
    "min_similarity", "duplicate_threshold", "pca_dim", "quality", "recall_target", "runner",
    "workers", "versions",
]


def _config(**search) -> RunConfig:
    catalog = CatalogInfo(input="/data/catalog.csv", kind="csv",
                          carried=(("category", "category", "string"),
                                   ("model", "manifest_model", "string")))
    model = ResolvedModel(name="m", handle="", model_id="m@1", input_size=224, dim=8,
                          engine="tflite")
    return RunConfig(
        catalog=catalog,
        model=ModelConfig(resolved=model, batch_size=2, threads=1, lanes=1),
        fetch=FetchConfig(),
        search=SearchConfig(top_k=5, **search),
        output=OutputConfig(root="/out", run_id="r1", started_at=0.0),
        runner=RunnerConfig(name="DirectRunner", workers=1, versions={"python": "3"}))


def test_manifest_settings_keep_the_manifest_keys_and_their_order():
    settings = _config().manifest_settings()
    assert list(settings) == MANIFEST_SETTINGS_KEYS
    assert settings["output"] == "/out" and settings["run_dir"] == "/out/runs/r1"
    assert settings["pca_dim"] is None  # 0 (off) is recorded as null, as before
    assert settings["quality"] == dict(PROFILES["fast"].to_dict(),
                                       similarity=PROFILES["fast"].similarity_definition())


def test_manifest_records_the_manifest_column_names_the_stages_read_feature_columns():
    config = _config(partition_column="category", exclude_column="manifest_model")
    settings = config.manifest_settings()
    assert settings["partition_by"] == "category"
    assert settings["exclude_same"] == "model"  # the user's name, not the prefixed column
    assert config.catalog.feature_column("model") == "manifest_model"
    assert config.catalog.feature_column("absent") is None


def test_root_and_run_dir_are_different_words():
    output = _config().output
    assert (output.root, output.run_dir) == ("/out", "/out/runs/r1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        output.root = "/elsewhere"  # type: ignore[misc]
