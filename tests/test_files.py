"""Atomic file writes of the artefacts other tools read."""

from __future__ import annotations

import os

from pipeline import files


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    target = tmp_path / "shared" / "manifest.json"
    files.write_json(str(target), {"ok": True})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by the loaders' users


def test_staged_output_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "index" / "vectors.npy"
    with files.staged_output(str(target)) as staged:
        assert staged.endswith("vectors.npy")  # writers that add a suffix keep the name
        assert os.path.dirname(staged) == str(target.parent)  # renamed, never copied
        with open(staged, "wb") as handle:
            handle.write(b"complete")
        assert not target.exists()  # nothing is published before the block succeeds
    assert target.read_bytes() == b"complete"

    try:
        with files.staged_output(str(target)) as staged:
            with open(staged, "wb") as handle:
                handle.write(b"half")
            raise RuntimeError("writer died")
    except RuntimeError:
        pass
    assert target.read_bytes() == b"complete"  # the old file is untouched
    assert os.listdir(target.parent) == ["vectors.npy"]  # and no temporary is left

