"""The pack's floors: nodes -> methods (samplers/, training/, evaluation/) -> shared machinery -> formats.

Every ``.py`` file of the pack is parsed (never imported) and each of its imports that lands inside the pack
is resolved to a top-level folder, relative imports by their level and module. An import that runs back up a
floor fails with the file, line and import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACK_DIRS = ("formats", "samplers", "training", "evaluation", "nodes")
# folder -> the pack folders its files must not import
FORBIDDEN = {
    "formats": {"samplers", "training", "evaluation", "nodes"},
    "samplers": {"training", "evaluation", "nodes"},
    "training": {"nodes"},
    "evaluation": {"nodes"},
}


def pack_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """``(line, top-level pack folder, import as written)`` for each import in ``path`` that resolves into
    the pack. Relative imports are resolved against the file's package; absolute ones count when they name
    a pack folder (``from training.x import y``, as a script run from the pack folder would write it)."""
    rel = path.relative_to(root)
    package = list(rel.parent.parts)  # the package the file belongs to (its folder), relative to the pack
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in PACK_DIRS:
                    found.append((node.lineno, top, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            written = "." * node.level + (node.module or "")
            if node.level == 0:
                parts = (node.module or "").split(".")
            else:
                up = node.level - 1
                if up > len(package):
                    continue  # above the pack root: not one of the pack's folders
                parts = package[: len(package) - up] + (node.module.split(".") if node.module else [])
                if not parts:  # `from .. import nodes` at the pack root: the names are the modules
                    parts = [node.names[0].name]
                    for alias in node.names[1:]:
                        if alias.name in PACK_DIRS:
                            found.append((node.lineno, alias.name, f"from {written} import {alias.name}"))
            top = parts[0] if parts else ""
            if top in PACK_DIRS:
                names = ", ".join(a.name for a in node.names)
                found.append((node.lineno, top, f"from {written} import {names}"))
    return found


def pack_files(root: Path = ROOT):
    for folder in PACK_DIRS:
        yield from sorted((root / folder).rglob("*.py"))


def floor_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in pack_files(root):
        floor = path.relative_to(root).parts[0]
        for line, target, text in pack_imports(path, root):
            if target in FORBIDDEN.get(floor, ()):
                bad.append(f"{path.relative_to(root)}:{line}: {text}  ({floor}/ must not import {target}/)")
    return bad


def test_every_import_stands_on_a_lower_floor():
    assert list(pack_files()), "no pack files found"
    bad = floor_violations()
    assert not bad, "imports that run back up a floor:\n" + "\n".join(bad)


def test_relative_imports_are_resolved_by_level_and_module(tmp_path):
    """The checker itself: each way of writing an import lands on the right folder."""
    (tmp_path / "samplers" / "fusion").mkdir(parents=True)
    (tmp_path / "formats").mkdir()
    (tmp_path / "samplers" / "fusion" / "x.py").write_text(
        "from ...training.edlora_trainer import a\n"  # samplers/fusion -> pack root -> training
        "from ..edlora import model\n"  # samplers/edlora: fine
        "from ... import evaluation\n"  # the folder named as the imported name
        "from .solvers import s\n"  # samplers/fusion/solvers: fine
        "def f():\n    from ...nodes.common import NodeError\n"  # a lazy import counts too
        "import torch\n"
    )
    (tmp_path / "formats" / "y.py").write_text("from .weights import w\nfrom ..samplers.edlora import model\n")
    found = {(p.parent.name, line, target) for p in (tmp_path / "samplers" / "fusion" / "x.py",
             tmp_path / "formats" / "y.py") for line, target, _ in pack_imports(p, tmp_path)}  # fmt: skip
    assert found == {
        ("fusion", 1, "training"),
        ("fusion", 2, "samplers"),
        ("fusion", 3, "evaluation"),
        ("fusion", 4, "samplers"),
        ("fusion", 6, "nodes"),
        ("formats", 1, "formats"),
        ("formats", 2, "samplers"),
    }
    bad = floor_violations(tmp_path)
    assert len(bad) == 4 and all(("must not import" in b) for b in bad), bad
