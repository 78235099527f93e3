"""The layering docs/DESIGN.md declares, checked against the code: no import cycle (imports inside functions count,
as they run all the same), no import from a layer above or from a sibling beside, and the light modules load no
torch. The table is read from DESIGN.md's "Layers" section, so the doc and the check cannot disagree."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for app.py and every module under lab/ and web/ (a package is its __init__.py)."""
    found = {"app": root / "app.py"} if (root / "app.py").exists() else {}
    for base in ("lab", "web"):
        for path in sorted((root / base).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import in the file can load, wherever the import stands (module level, a function, an
    `if TYPE_CHECKING:`): `from a import b` names `a` and `a.b`, so a lazy import is an arrow as much as a
    top-level one (docs/DESIGN.md, "Layers")."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (an imported name resolves to its longest known module)."""
    modules = project_modules(root)

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    return {name: {m for t in imported_names(name, path) if (m := resolve(t)) and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def declared_layers(design: Path = DESIGN) -> list[list[tuple[str, list[str]]]]:
    """DESIGN.md's layer table, top layer first: the first fenced block of its "## Layers" section, one layer a line,
    each `group: path path ...`, siblings on one line parted by `|` (siblings import nothing from each other)."""
    section = design.read_text().split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S)
    assert block, f"{design}: its Layers section has no fenced layer table; put `group: paths` lines in one"
    layers = []
    for line in block.group(1).strip().splitlines():
        groups = []
        for part in line.split("|"):
            group, _, paths = part.partition(":")
            assert paths.strip(), f"{design}: layer line {line!r}: write each group as `name: path path ...`"
            groups.append((group.strip(), paths.split()))
        layers.append(groups)
    return layers


def place(path: str, layers) -> tuple[int, str] | None:
    """(layer number counted from the top, group) of a file, by the longest declared path that holds it."""
    best = None
    for level, groups in enumerate(layers):
        for group, paths in groups:
            for declared in paths:
                holds = path == declared or (declared.endswith("/") and path.startswith(declared))
                if holds and (best is None or len(declared) > best[0]):
                    best = (len(declared), level, group)
    return best and best[1:]


def layering_errors(root: Path, layers) -> list[str]:
    modules = project_modules(root)
    where = {name: place(path.relative_to(root).as_posix(), layers) for name, path in modules.items()}
    errors = [f"{modules[name].relative_to(root)} is in no layer: add it to a group of docs/DESIGN.md's layer table"
              for name, placed in where.items() if placed is None]
    for name, targets in sorted(import_graph(root).items()):
        if where[name] is None:
            continue
        level, group = where[name]
        for target in sorted(targets):
            if where[target] is None:
                continue
            target_level, target_group = where[target]
            if target_level > level or target_group == group:
                continue
            side = "above it" if target_level < level else "beside it (a sibling)"
            errors.append(f"{modules[name].relative_to(root)} ({group}) imports {target} ({target_group}), a layer "
                          f"{side}: move what it needs down, or pass it in from above")
    return errors


def test_the_library_and_the_page_have_no_import_cycle_lazy_imports_included():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles (lazy imports count): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_from_a_layer_above_it_or_beside_it():
    assert layering_errors(ROOT, declared_layers()) == []


def test_the_check_sees_an_import_inside_a_function_and_an_upward_arrow(tmp_path):
    # A two-module library whose only cycle is a lazy import, and whose lower module imports the upper one.
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "__init__.py").write_text("")
    (tmp_path / "lab" / "low.py").write_text("def late():\n    from lab import high\n    return high\n")
    (tmp_path / "lab" / "high.py").write_text("from lab.low import late\n")
    (tmp_path / "web").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "DESIGN.md").write_text(
        "# x\n\n## Layers\n\n```\nupper: lab/high.py\nlower: lab/low.py lab/__init__.py\n```\n")
    assert cycles(import_graph(tmp_path)) == [["lab.high", "lab.low"]]
    assert layering_errors(tmp_path, declared_layers(tmp_path / "docs" / "DESIGN.md")) == [
        "lab/low.py (lower) imports lab.high (upper), a layer above it: move what it needs down, or pass it in "
        "from above"]


@pytest.mark.parametrize("module", ["web.pcm", "lab.audio", "lab.engines", "lab.serving.line",
                                    "lab.serving.comparisons", "lab.serving.background", "lab.serving.scheduler"])
def test_the_page_s_audio_the_serving_core_and_the_engine_registry_load_no_torch(module):
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False", f"import {module} loads torch"
