"""Operational faults: output root problems, reused run ids, full disks while writing vectors."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pipeline import similarity_search
from pipeline.run import main, run
from tests.conftest import write_catalog


def test_output_root_that_is_a_file_is_one_line_and_exit_2(tmp_path, tiny_model, capsys):
    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    root.write_text("not a directory")
    code = main([f"--input={catalog}", f"--output={root}", f"--model={tiny_model}"])
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("progress: ")]  # an earlier run's live progress
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert root.read_text() == "not a directory"


def test_a_run_id_that_already_exists_is_refused(tmp_path, tiny_model, capsys):
    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    first = run([f"--input={catalog}", f"--output={root}", f"--model={tiny_model}",
                 "--top_k=3", "--run_id=night1"])
    before = sorted(os.listdir(first["run_dir"]))
    code = main([f"--input={catalog}", f"--output={root}", f"--model={tiny_model}",
                 "--top_k=3", "--run_id=night1"])
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("progress: ")]  # an earlier run's live progress
    assert code == 2 and len(err) == 1 and "already exists" in err[0]
    assert sorted(os.listdir(first["run_dir"])) == before
    assert os.path.realpath(root / "LATEST") == os.path.realpath(first["run_dir"])


def test_enospc_reported_at_fsync_is_an_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    """Some filesystems only report a full disk when the data is flushed."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(similarity_search.os, "fsync", full)
    with pytest.raises(OSError) as caught:
        similarity_search.save_vectors(tmp_path / "vectors.npy", np.ones((10, 4), np.float32))
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_full_tmpfs_while_saving_vectors_raises_enospc(tmp_path):
    mount_dir = tmp_path / "small"
    mount_dir.mkdir()
    if os.system(f"mount -t tmpfs -o size=64k tmpfs {mount_dir} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(OSError) as caught:
            similarity_search.save_vectors(mount_dir / "vectors.npy",
                                           np.ones((1000, 128), np.float32))
        assert caught.value.errno == errno.ENOSPC
        assert os.listdir(mount_dir) == []
    finally:
        os.system(f"umount {mount_dir}")


@pytest.mark.parametrize("damage", ["no_manifest", "truncated_manifest", "truncated_parquet",
                                    "empty_features", "foreign_parquet", "latest_outside"])
def test_a_damaged_previous_run_is_skipped_not_fatal(tmp_path, tiny_model, damage):
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    args = [f"--input={catalog}", f"--output={root}", f"--model={tiny_model}", "--top_k=3"]
    first = run(args)
    run_dir = first["run_dir"]
    shards = glob.glob(os.path.join(run_dir, "features", "*.parquet"))
    if damage == "no_manifest":
        os.unlink(os.path.join(run_dir, "manifest.json"))
    elif damage == "truncated_manifest":
        with open(os.path.join(run_dir, "manifest.json"), "r+b") as handle:
            handle.truncate(20)
    elif damage == "truncated_parquet":
        with open(shards[0], "r+b") as handle:
            handle.truncate(100)
    elif damage == "empty_features":
        for shard in shards:
            os.unlink(shard)
    elif damage == "foreign_parquet":
        for shard in shards:
            os.unlink(shard)
        pq.write_table(pa.table({"x": list(range(first["counts"]["embedded"]))}), shards[0])
    else:
        outside = tmp_path / "elsewhere"
        os.rename(run_dir, outside)
        os.unlink(root / "LATEST")
        os.symlink(str(outside), root / "LATEST")
    second = run(args)
    assert second["counts"]["reused"] == 0
    assert second["reuse"].startswith("full rebuild: ")
    assert second["counts"]["embedded"] == first["counts"]["embedded"]
    assert os.path.realpath(root / "LATEST") == os.path.realpath(second["run_dir"])


def test_publish_guard_keeps_latest_on_a_good_run_unless_forced(tmp_path, tiny_model, capsys):
    import csv

    catalog = write_catalog(tmp_path / "cat")
    root = tmp_path / "root"
    args = [f"--output={root}", f"--model={tiny_model}", "--top_k=3"]
    first = run([f"--input={catalog}", *args])
    with open(catalog, newline="") as handle:
        rows = list(csv.DictReader(handle))
    small = tmp_path / "cat" / "small.csv"
    with open(small, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:3])
    code = main([f"--input={small}", *args])
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("progress: ")]  # an earlier run's live progress
    assert code == 2 and len(err) == 1 and "--max_product_loss" in err[0]
    assert os.path.realpath(root / "LATEST") == os.path.realpath(first["run_dir"])
    assert main([f"--input={small}", *args, "--force_publish"]) == 0
    assert os.path.realpath(root / "LATEST") != os.path.realpath(first["run_dir"])
