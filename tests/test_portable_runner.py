"""The job on Beam's portable runner gives DirectRunner's outputs, byte for byte.

A local job service and an EXTERNAL worker pool run on 127.0.0.1 in their own
processes (tests/beam_services.py); workers unpickle and run every DoFn
themselves, as on a distributed runner. A full run and an incremental second
run are compared with the same runs on DirectRunner.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.run import run
from tests.beam_services import BeamPortableServices
from tests.conftest import FAMILIES, shape_image, write_catalog

COMPARED = ("neighbors", "duplicates", "errors")


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Job service + EXTERNAL worker pool, stopped after this module."""
    with BeamPortableServices(tmp_path_factory.mktemp("beam-services")) as started:
        yield started


def _text_files(run_dir: Path) -> dict[str, bytes]:
    found = {}
    for sub in COMPARED:
        for path in sorted((run_dir / sub).glob("*")):
            found[f"{sub}/{path.name}"] = path.read_bytes()
    for path in sorted(run_dir.glob("similar_products-*.jsonl")):
        found[path.name] = path.read_bytes()
    return found


def _features(run_dir: Path):
    table = pq.read_table(run_dir / "features")
    return table.sort_by("product_id").to_pylist()


def assert_same_outputs(direct: Path, portable: Path) -> None:
    """Neighbours, pairs, duplicates and errors byte-identical; feature rows equal."""
    expected, got = _text_files(direct), _text_files(portable)
    assert sorted(got) == sorted(expected)
    assert any(name.startswith("neighbors/") for name in got)
    for name in expected:
        assert got[name] == expected[name], name
    assert _features(portable) == _features(direct)


def test_portable_runner_matches_direct_runner_on_full_and_incremental_runs(tmp_path, services):
    catalog = write_catalog(tmp_path / "catalog", bad={"bad-1": b"not an image"})
    common = [f"--input={catalog}", "--model=raw_pixels_32", "--top_k=5"]
    direct_root, portable_root = tmp_path / "direct", tmp_path / "portable"

    first = run(common + [f"--output={direct_root}", "--run_id=r1"])
    got = run(common + [f"--output={portable_root}", "--run_id=r1"] + services.pipeline_args())
    assert got["counts"] == first["counts"] and got["counts"]["failed"] == 1
    assert_same_outputs(direct_root / "runs" / "r1", portable_root / "runs" / "r1")

    # Second night: one image changed, one product added; the rest is reused.
    images = catalog.parent / "images"
    shape_image("disc", (10, 10, 10)).save(images / "p00-0.jpg", quality=92)
    shape_image(*FAMILIES[1]).save(images / "new-1.jpg", quality=92)
    with open(catalog, "a") as handle:
        handle.write("new-1,images/new-1.jpg,f1\n")
    second = run(common + [f"--output={direct_root}", "--run_id=r2"])
    got = run(common + [f"--output={portable_root}", "--run_id=r2"] + services.pipeline_args())
    assert got["counts"] == second["counts"]
    assert got["counts"]["reused"] == first["counts"]["embedded"] - 1
    assert got["counts"]["newly_embedded"] == 2
    assert_same_outputs(direct_root / "runs" / "r2", portable_root / "runs" / "r2")
    assert (portable_root / "LATEST").resolve() == (portable_root / "runs" / "r2").resolve()
