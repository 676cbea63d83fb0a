"""The README's first command: the built-in sample, with the offline default model."""

from __future__ import annotations

import glob
import json

from pipeline.run import run
from pipeline.sample import PHOTOS, VARIANTS, write_sample


def test_sample_siblings_come_back_as_top_neighbours(tmp_path):
    manifest = write_sample(str(tmp_path / "sample"))
    result = run([f"--input={manifest}", f"--output={tmp_path / 'out'}"])
    assert result["model"].startswith("efficientnet_lite0@")
    assert result["counts"]["embedded"] == len(PHOTOS) * len(VARIANTS)
    assert result["counts"]["failed_by_reason"] == {"decode:not_an_image": 1}
    records = [json.loads(line) for path in glob.glob(f"{result['run_dir']}/neighbors/*.jsonl")
               for line in open(path)]
    for record in records:
        photo = record["product_id"].rsplit("-", 1)[0]
        top3 = {n["product_id"].rsplit("-", 1)[0] for n in record["neighbors"][:3]}
        assert top3 == {photo}, record
