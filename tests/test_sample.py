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


def test_a_verified_offline_model_starts_without_tensorflow():
    import subprocess
    import sys

    from pipeline.models.registry import resolve_model

    first = resolve_model("efficientnet_lite0")  # converts and verifies once (cached)
    assert first.engine == "tflite"
    code = ("import sys; from pipeline.models.registry import resolve_model; "
            "r = resolve_model('efficientnet_lite0'); "
            "print(r.model_id, r.input_size, r.dim, r.engine, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [first.model_id, "224", "1280", "tflite", "False"]
