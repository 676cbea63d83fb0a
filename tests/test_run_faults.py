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


# --- faults inside a Beam stage, interrupts, leftovers (issue 15) --------------------------


def _temporaries(root) -> list[str]:
    from pipeline.publish import is_temporary

    return [os.path.join(parent, name) for parent, dirs, names in os.walk(root)
            for name in dirs + names if is_temporary(name)]


def _one_error_line(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines()
            if line and not line.startswith("progress: ")]


def test_a_full_disk_inside_a_beam_stage_is_one_line_and_leaves_no_temporaries(
        tmp_path, tiny_model, capsys):
    from pipeline.run_lock import LOCK_FILE

    mount_dir = tmp_path / "disk"
    mount_dir.mkdir()
    if os.system(f"mount -t tmpfs -o size=1m tmpfs {mount_dir} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        catalog = write_catalog(tmp_path / "cat")
        root = mount_dir / "root"
        args = [f"--input={catalog}", f"--output={root}", f"--model={tiny_model}", "--top_k=3",
                "--no_progress", "--full_rebuild"]
        first = run(args)
        free = os.statvfs(mount_dir).f_bavail * os.statvfs(mount_dir).f_frsize
        with open(mount_dir / "filler", "wb") as handle:  # leave ~12 KiB: a stage's write fails
            handle.write(b"\0" * max(0, free - 12 * 1024))
        capsys.readouterr()
        code = main(args)
        err = _one_error_line(capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {root}") and "No space left on device" in err[0]
        assert "Traceback" not in err[0]
        assert os.path.realpath(root / "LATEST") == os.path.realpath(first["run_dir"])
        assert _temporaries(root) == []
        assert not (root / LOCK_FILE).exists()
    finally:
        os.system(f"umount {mount_dir}")


HANG_CATALOG_ROWS = 6


@pytest.mark.parametrize("signame, expected", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_run_stops_within_seconds_and_leaves_latest(tmp_path, tiny_model,
                                                                     signame, expected):
    import signal
    import subprocess
    import sys
    import time

    from pipeline.run_lock import LOCK_FILE
    from tests.beam_services import REPO, repo_env
    from tests.http_fixtures import LocalHttpServer

    root = tmp_path / "root"
    first = run([f"--input={write_catalog(tmp_path / 'cat')}", f"--output={root}",
                 f"--model={tiny_model}", "--top_k=3"])
    server = LocalHttpServer().start()
    try:
        catalog = tmp_path / "hang.csv"
        catalog.write_text("product_id,image\n" + "".join(
            f"h{i},{server.url('hang')}?{i}\n" for i in range(HANG_CATALOG_ROWS)))
        env = repo_env()
        env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # this test process set it; a shell has not
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", f"--input={catalog}", f"--output={root}",
             f"--model={tiny_model}", "--allow_private_hosts", "--fetch_timeout=60",
             "--fetch_total_timeout=600", "--fetch_retries=5", "--no_progress"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while not sum(server.hits.values()) and time.monotonic() < deadline \
                    and child.poll() is None:
                time.sleep(0.2)
            assert sum(server.hits.values()), "the run never started its downloads"
            time.sleep(0.5)
            child.send_signal(getattr(signal, signame))
            started = time.monotonic()
            _, stderr = child.communicate(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    finally:
        server.stop()
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("progress: ")]
    assert child.returncode == expected, stderr[-3000:]
    assert elapsed < 20, f"took {elapsed:.1f} s after {signame}"
    name = os.path.basename(first["run_dir"])
    assert lines == [f"interrupted; LATEST still points at runs/{name}"], stderr[-3000:]
    assert os.path.realpath(root / "LATEST") == os.path.realpath(first["run_dir"])
    assert not (root / LOCK_FILE).exists()
    interrupted = [d for d in os.listdir(root / "runs") if d != name]
    assert len(interrupted) == 1
    assert os.path.exists(root / "runs" / interrupted[0] / "INCOMPLETE")
    assert _temporaries(root) == []
