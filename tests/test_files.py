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
