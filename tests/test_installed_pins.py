"""The installed packages agree with the pins the pipeline and its main libraries declare.

Beam 2.77 caps numpy, pyarrow, protobuf and pillow; a test-only package released
later (pillow-heif 1.9 needs pillow 13) can make pip move one past its cap, and the
job then runs on a combination nobody tested. Checked for the project, the
libraries whose caps matter and the test requirements, not for unrelated packages
that happen to be installed.
"""

from __future__ import annotations

import os
from importlib import metadata

import pytest
from packaging.requirements import Requirement

CHECKED = ("visual-similarity-pipeline", "apache-beam", "tensorflow", "pillow-heif")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _file_requirements(name: str) -> list[str]:
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].strip() for line in handle]
    return [line for line in lines if line and not line.startswith("-")]


def _conflicts(requirements, source: str) -> list[str]:
    found = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue  # optional here; a missing required package fails its own import
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            found.append(f"{source} needs {req}, installed {req.name} {installed}")
    return found


def test_installed_versions_satisfy_the_declared_pins():
    conflicts = _conflicts(_file_requirements("requirements.txt"), "requirements.txt")
    conflicts += _conflicts(_file_requirements("requirements-test.txt"), "requirements-test.txt")
    checked = 0
    for dist in CHECKED:
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        conflicts += _conflicts(requires, dist)
    if checked == 0:
        pytest.skip("none of the checked distributions is installed")
    assert not conflicts, "; ".join(conflicts)
