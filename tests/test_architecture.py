"""The map in docs/architecture.md, checked: layers import downwards only, switches live in one place.

These are the rules a newcomer is told; a change that breaks one should
change the map on purpose, not by accident.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fusion import environment

REPO = Path(__file__).resolve().parents[1]

#: dicom_node's layers, lowest first; a module may import its own layer and the ones before it
LAYERS: list[tuple[str, ...]] = [
    ("dicom_node.config", "dicom_node.errors", "dicom_node.states", "dicom_node.logs", "dicom_node.audit",
     "dicom_node.events"),
    ("dicom_node.dicom",),
    ("dicom_node.index",),
    ("dicom_node.net",),
    ("dicom_node.outbox",),
    ("dicom_node.workflow",),
    ("dicom_node.web",),
    ("dicom_node.cli", "dicom_node.provision", "dicom_node.__init__"),
]


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_fusion_knows_nothing_of_the_node():
    for path in _modules("fusion"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("dicom_node", "fusion_demo")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: fusion is arrays in, arrays out"


def test_the_service_does_not_depend_on_the_demo():
    for path in _modules("dicom_node"):
        if _dotted(path) == "dicom_node.cli":
            continue  # `fusion-node demo` starts it (lazily)
        bad = {m for m in _imports(path) if m.startswith("fusion_demo")}
        assert not bad, f"{path.relative_to(REPO)} imports the demo package"


def test_dicom_node_layers_import_downwards_only():
    for path in _modules("dicom_node"):
        own = _layer(_dotted(path))
        assert own is not None, f"{path.relative_to(REPO)} is in no layer of docs/architecture.md"
        for imported in _imports(path):
            if not imported.startswith("dicom_node"):
                continue
            target = _layer(imported)
            if target is None or imported == "dicom_node":  # the package itself (its __version__)
                continue
            assert target <= own, (f"{_dotted(path)} (layer {own}) imports {imported} (layer {target}); "
                                   "see docs/architecture.md for where that code belongs")


@pytest.mark.parametrize("package", ["dicom_node", "fusion", "fusion_demo"])
def test_every_package_says_what_belongs_there(package):
    for init in (REPO / package).rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.strip(), f"{init.relative_to(REPO)} has no docstring saying what belongs there"


def test_environment_is_read_in_one_module_only():
    pattern = re.compile(r"os\.environ|os\.getenv|getenv\(")
    for folder in ("dicom_node", "fusion", "fusion_demo", "benchmarks", "tests"):
        for path in _modules(folder):
            if path == REPO / "fusion" / "environment.py" or path == Path(__file__):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and "monkeypatch" not in code:
                    pytest.fail(f"{path.relative_to(REPO)}:{n} reads the environment; use fusion.environment")


def test_operations_guide_lists_every_environment_switch():
    text = (REPO / "docs" / "operations.md").read_text()
    section = text[text.index("## Environment switches"):]
    listed = set(re.findall(r"^\| `(FUSION_[A-Z0-9_]+)` \|", section, flags=re.M))
    assert listed == {s.name for s in environment.SWITCHES}


def test_nothing_cites_files_outside_the_repository():
    pattern = re.compile(r"\bDESIGN\.md\b|\bSPEC\.md\b|\.\./shared/(DESIGN|reference/SPEC)")
    for folder in ("dicom_node", "fusion", "fusion_demo", "benchmarks", "tests", "docs"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path != Path(__file__):
                assert not pattern.search(path.read_text()), f"{path.relative_to(REPO)} cites a file outside the repo"


def test_every_noqa_and_type_ignore_gives_its_reason():
    for folder in ("dicom_node", "fusion", "fusion_demo", "benchmarks", "tests"):
        for path in _modules(folder):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                for marker in ("# noqa", "# type: ignore"):
                    if marker in line and path != Path(__file__):
                        rest = line.split(marker, 1)[1]
                        assert re.search(r"\s-\s\S|#\s*\S", rest), \
                            f"{path.relative_to(REPO)}:{n}: `{marker}` without a reason after ' - '"
