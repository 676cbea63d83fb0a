"""The import rule of ARCHITECTURE.md, checked on the source (no module is imported).

* The bottom layer (the plain library) imports nothing above it and no Beam graph code:
  only ``apache_beam.io.filesystems`` (paths on any filesystem) and
  ``apache_beam.io.filesystem`` (its compression flag) are allowed.
* Outside ``transforms/`` itself (``bench/`` and ``runners/`` included), only the wiring
  (``pipeline/graph.py``, ``pipeline/run.py`` and the query CLI's ``pipeline/query.py``)
  imports ``transforms``.
* No import cycles between the project's modules.

There are no exceptions: a new import that breaks the rule fails the test, and the fix is
to move the code it needs down a layer (see ARCHITECTURE.md, "where to change what").
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "transforms", "runners", "bench")

BOTTOM = {
    "pipeline.csv_records", "pipeline.features", "pipeline.files", "pipeline.http_fetch",
    "pipeline.catalog", "pipeline.file_bytes", "pipeline.image_decode", "pipeline.locations",
    "pipeline.postprocess", "pipeline.publish", "pipeline.row_errors", "pipeline.similarity_index",
    "pipeline.ivf", "pipeline.logs", "pipeline.product_ids", "pipeline.quality", "pipeline.run_config",
    "pipeline.records", "pipeline.index_description", "pipeline.run_layout", "pipeline.run_reader",
    "pipeline.vector_blocks", "pipeline.vectors",
    "pipeline.similarity_search", "pipeline.annoy_forests", "pipeline.models",
    "pipeline.models.autoencoder",
    "pipeline.models.cache", "pipeline.models.efficientnet_lite", "pipeline.models.engines",
    "pipeline.models.raw_pixels", "pipeline.models.registry", "pipeline.models.torch_legacy",
    "pipeline.models.handler", "pipeline.models.sources", "pipeline.models.specs",
}
WIRING = {"pipeline.graph", "pipeline.run", "pipeline.query"}
# Paths on any filesystem, and the compression flag of FileSystems.open.
ALLOWED_BEAM_IN_BOTTOM = {"apache_beam.io.filesystems", "apache_beam.io.filesystem"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: pathlib.Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            # "from pipeline import files" imports the module pipeline.files.
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return names


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_the_bottom_layer_imports_nothing_above_it_and_no_beam_graph_code():
    found = set()
    for module in BOTTOM:
        for imported in GRAPH[module]:
            if imported.startswith("apache_beam") and imported not in ALLOWED_BEAM_IN_BOTTOM:
                found.add((module, imported))
            elif _project(imported) and imported in MODULES and imported not in BOTTOM \
                    and imported != "pipeline":
                found.add((module, imported))
    assert not found, sorted(found)


def test_only_the_wiring_imports_transforms():
    found = set()
    for module, imports in GRAPH.items():
        if module.startswith("transforms") or module in WIRING:
            continue
        found.update((module, i) for i in imports if i.split(".")[0] == "transforms")
    assert not found, sorted(found)


def test_there_are_no_import_cycles():
    edges = {m: {i for i in imports if i in MODULES and i != m and i != "pipeline"}
             for m, imports in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_rule_sees_the_modules_it_names():
    # A renamed module must not silently drop out of the check.
    assert BOTTOM <= MODULES.keys() and WIRING <= MODULES.keys()
    assert "pipeline.files" in GRAPH["pipeline.run_layout"]  # imports inside functions count
    assert "transforms.decode" in GRAPH["pipeline.graph"]
