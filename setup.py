"""Packaging for the visual-similarity precompute pipeline.

Also the ``--setup_file`` Dataflow workers install from: it ships the
``pipeline``, ``transforms`` and ``runners`` packages and installs the pinned
dependencies of requirements.txt (TensorFlow is not in Beam's worker images).
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as handle:
        return [line.split("#", 1)[0].strip() for line in handle
                if line.split("#", 1)[0].strip()]


setup(
    name="visual-similarity-pipeline",
    version="0.1.0",
    description="Batch precompute of visually similar products with Apache Beam, "
                "TensorFlow and Annoy",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*",
                                    "runners", "runners.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "test": _requirements("requirements-test.txt"),
        "gcp": ["apache-beam[gcp]==2.77.0"],
    },
    entry_points={"console_scripts": [
        "similarity-run=pipeline.run:main",
        "similarity-sample=pipeline.sample:main",
    ]},
)
