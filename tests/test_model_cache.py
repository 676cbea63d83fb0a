"""A damaged or unwritable model cache never stops a run (issue 15).

Entries carry a digest record written before their atomic rename; a
truncated, emptied or overwritten file is rebuilt with one warning, and a
cache that cannot be written (read-only, a file, a full disk) falls back to a
per-user temporary cache with one warning. The rebuilt TFLite model is
byte-identical, so the run's embeddings are too.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.models import cache, engines
from tests.conftest import write_catalog


def _build(content: bytes):
    def build(directory: str) -> None:
        Path(directory, "model.bin").write_bytes(content)
        Path(directory, "sub").mkdir()
        Path(directory, "sub", "vars").write_bytes(content[::-1])
    return build


def _damage(entry: Path, how: str) -> None:
    target = entry / "model.bin"
    if how == "truncated":
        with open(target, "r+b") as handle:
            handle.truncate(3)
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "garbage":  # same size, other bytes
        target.write_bytes(b"x" * target.stat().st_size)
    elif how == "missing_file":
        (entry / "sub" / "vars").unlink()
    elif how == "no_record":
        (entry / cache.RECORD_FILE).unlink()
    elif how == "bad_record":
        (entry / cache.RECORD_FILE).write_text("{not json")
    elif how == "entry_is_a_file":
        shutil.rmtree(entry)
        entry.write_text("stray")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "_warned_fallback", set())
    monkeypatch.setattr(cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "missing_file", "no_record",
                                 "bad_record", "entry_is_a_file"])
def test_a_damaged_entry_is_rebuilt_identically_with_one_warning(tmp_path, how, caplog):
    root = tmp_path / "cache"
    content = os.urandom(5000)
    path = Path(cache.ensure_cached_dir("entry", _build(content), root=root))
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        again = Path(cache.ensure_cached_dir("entry", _build(content), root=root))
    assert again == path
    assert (again / "model.bin").read_bytes() == content
    assert cache.entry_problem(again) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and "rebuilding" in warnings[0]
    assert sorted(p.name for p in root.iterdir()) == ["entry"]  # nothing left aside


def test_an_intact_entry_is_used_as_is_and_never_rewritten(tmp_path):
    root = tmp_path / "cache"
    path = Path(cache.ensure_cached_dir("entry", _build(b"abc"), root=root))
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}

    def must_not_run(directory):
        raise AssertionError("rebuilt an intact entry")

    assert cache.ensure_cached_dir("entry", must_not_run, root=root) == str(path)
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    assert cache.lookup("entry", root) == str(path)
    _damage(path, "garbage")
    assert cache.lookup("entry", root) is None  # the fast path never hands out damage


def test_a_cache_path_that_is_a_file_falls_back_to_a_temporary_cache(tmp_path, caplog):
    root = tmp_path / "cache"
    root.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        first = cache.ensure_cached_dir("entry", _build(b"abc"), root=root)
        second = cache.ensure_cached_dir("other", _build(b"def"), root=root)
    assert Path(first).parent == Path(second).parent == cache.temporary_root()
    assert Path(first, "model.bin").read_bytes() == b"abc"
    assert root.read_text() == "not a directory"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not writable" in warnings[0] and str(root) in warnings[0]
    assert cache.lookup("entry", root) == first  # later runs find the fallback's entry


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.system(f"mount -t tmpfs -o {options} tmpfs {path} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        os.system(f"umount {path}")


def test_a_read_only_cache_with_a_damaged_entry_falls_back(tmp_path, caplog):
    with _tmpfs(tmp_path / "ro", "size=1m") as root:
        entry = Path(cache.ensure_cached_dir("entry", _build(b"abc" * 100), root=root))
        _damage(entry, "truncated")
        assert os.system(f"mount -o remount,ro {root}") == 0
        with caplog.at_level(logging.WARNING, logger=cache.__name__):
            path = cache.ensure_cached_dir("entry", _build(b"abc" * 100), root=root)
        assert Path(path).parent == cache.temporary_root()
        assert Path(path, "model.bin").read_bytes() == b"abc" * 100
        messages = [r.getMessage() for r in caplog.records]
        assert any("not writable" in m and "Read-only" in m for m in messages)


def test_a_full_cache_disk_falls_back_and_leaves_no_partial_build(tmp_path, caplog):
    with _tmpfs(tmp_path / "full", "size=64k") as root:
        with caplog.at_level(logging.WARNING, logger=cache.__name__):
            path = cache.ensure_cached_dir("entry", _build(os.urandom(200_000)), root=root)
        assert Path(path).parent == cache.temporary_root()
        assert cache.entry_problem(path) is None
        assert os.listdir(root) == []  # the failed build's directory is gone
        assert any("No space left" in r.getMessage() for r in caplog.records)


def _race(root: str, content: bytes, barrier, results) -> None:
    barrier.wait(timeout=60)
    path = cache.ensure_cached_dir("entry", _build(content), root=root)
    results.put((path, cache.entry_problem(path)))


def test_concurrent_builders_of_a_damaged_entry_leave_one_intact_entry(tmp_path):
    root = tmp_path / "cache"
    content = os.urandom(300_000)
    entry = Path(cache.ensure_cached_dir("entry", _build(content), root=root))
    _damage(entry, "truncated")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(str(root), content, barrier, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [(str(entry), None)] * 4
    assert (entry / "model.bin").read_bytes() == content
    assert sorted(p.name for p in root.iterdir()) == ["entry"]


def _vectors(run_dir: str) -> dict:
    rows = {}
    for shard in sorted(glob.glob(os.path.join(run_dir, "features", "*.parquet"))):
        table = pq.read_table(shard, columns=["product_id", "embedding"]).to_pylist()
        rows.update({r["product_id"]: r["embedding"] for r in table})
    return rows


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines()
            if line and not line.startswith("progress: ")]


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_run_with_a_damaged_tflite_cache_rebuilds_it_byte_identical(tmp_path, tiny_model,
                                                                      capsys, monkeypatch, how):
    from pipeline.run import main

    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(tmp_path / "models"))
    catalog = write_catalog(tmp_path / "cat")
    args = [f"--input={catalog}", f"--model={tiny_model}", "--top_k=3", "--full_rebuild",
            "--no_progress"]
    assert main([*args, f"--output={tmp_path / 'one'}"]) == 0
    (tflite,) = glob.glob(str(tmp_path / "models" / "tflite-*" / engines.TFLITE_FILE))
    original = Path(tflite).read_bytes()
    capsys.readouterr()
    if how == "truncated":
        with open(tflite, "r+b") as handle:
            handle.truncate(len(original) // 3)
    else:
        Path(tflite).write_bytes(os.urandom(len(original)))
    assert main([*args, f"--output={tmp_path / 'two'}"]) == 0
    err = _err_lines(capsys)
    assert len(err) == 1 and "is damaged" in err[0] and "Traceback" not in err[0], err
    assert Path(tflite).read_bytes() == original
    first = _vectors(str(tmp_path / "one" / "LATEST"))
    assert first and _vectors(str(tmp_path / "two" / "LATEST")) == first


def test_a_run_whose_cache_path_is_a_file_uses_a_temporary_cache(tmp_path, tiny_model, capsys,
                                                                 monkeypatch):
    from pipeline.run import main

    blocked = tmp_path / "models"
    blocked.write_text("a file, not a directory")
    monkeypatch.setenv(cache.CACHE_ENV_VAR, str(blocked))
    catalog = write_catalog(tmp_path / "cat")
    code = main([f"--input={catalog}", f"--output={tmp_path / 'out'}", f"--model={tiny_model}",
                 "--top_k=3", "--no_progress"])
    err = _err_lines(capsys)
    assert code == 0
    assert len(err) == 1 and "not writable" in err[0] and str(blocked) in err[0], err
    assert blocked.read_text() == "a file, not a directory"
    assert glob.glob(str(cache.temporary_root() / "tflite-*" / engines.TFLITE_FILE))
