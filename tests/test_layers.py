"""The package's layers: every import points at the module's own layer or one below it.

From the bottom: the cross-cutting modules (errors, logging, timing, private files); run
configuration; tasks and data; the TRAK math; secure aggregation's primitives; privacy; the wire
format; what a run leaves; the two sides, client and server, which never import each other; and
the simulations (CLI, evaluation, attacks) on top. The package face (``fedtrak/__init__.py``)
names its public API from every layer and loads each name only when it is first used.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The import name each top-level folder is installed as.
FOLDERS = {"shared": "fedtrak", "client": "fedtrak.client", "server": "fedtrak.server",
           "simulations": "fedtrak.simulations"}
#: Bottom to top; a module may import its own layer and those below.
LAYERS = [
    ("fedtrak.errors", "fedtrak.logs", "fedtrak.timing", "fedtrak.private_files"),
    ("fedtrak.config",),
    ("fedtrak.data",),
    ("fedtrak.trak",),
    ("fedtrak.secagg",),
    ("fedtrak.privacy",),
    ("fedtrak.wire",),
    ("fedtrak.results",),
    ("fedtrak.client", "fedtrak.server"),
    ("fedtrak.simulations",),
]
#: Same layer, and still never: the two sides of the protocol.
APART = {("fedtrak.client", "fedtrak.server"), ("fedtrak.server", "fedtrak.client")}


def _unit(module: str) -> str | None:
    """The layer entry ``module`` belongs to (``None``: the package face itself)."""
    matches = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    return max(matches, key=len) if matches else None


def _level(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every fedtrak module ``path`` imports (at any depth: inside functions too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("fedtrak")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedtrak"):
            found += [(node.lineno, f"{node.module}.{a.name}" if node.module == "fedtrak" else node.module)
                      for a in node.names]
    return found


def layer_problems(files: list[Path]) -> list[str]:
    """``file:line: A imports B`` for each import from a lower layer to a higher one, or between
    the two sides."""
    problems = []
    for path in files:
        module = _module_name(path)
        own = _unit(module)
        if own is None:
            continue  # the package face
        for line, target in _imports(path):
            other = _unit(target)
            where = f"{path.relative_to(ROOT)}:{line}: {module} imports {target}"
            if other is None:
                problems.append(f"{where} (the package face: import the module that defines the name)")
            elif _level(other) > _level(own) or (own, other) in APART:
                problems.append(where)
    return problems


def _package_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_every_module_sits_in_a_layer():
    missing = [str(p.relative_to(ROOT)) for p in _package_files() if _unit(_module_name(p)) is None
               and p != ROOT / "shared" / "__init__.py"]
    assert not missing, f"modules outside every layer (add a subpackage to LAYERS or move them): {missing}"


def test_no_import_points_up_a_layer():
    problems = layer_problems(_package_files())
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The scan is not vacuous: a config module importing the TRAK math, and the client importing
    the server, are both reported."""
    for rel, text in {"shared/config/bad.py": "def f():\n    from fedtrak.trak.kernel import Kernel\n",
                      "client/bad.py": "from fedtrak.server import app\n",
                      "shared/data/fine.py": "from fedtrak.config.settings import Settings\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = layer_problems(sorted(tmp_path.rglob("*.py")))
    assert len(problems) == 2
    assert any("fedtrak.config.bad imports fedtrak.trak.kernel" in p for p in problems)
    assert any("fedtrak.client.bad imports fedtrak.server" in p for p in problems)


def test_the_shared_root_holds_only_the_face_and_cross_cutting_modules():
    loose = sorted(p.name for p in (ROOT / "shared").glob("*.py"))
    assert loose == ["__init__.py", "errors.py", "logs.py", "private_files.py", "timing.py"], loose


def test_a_supernode_loads_neither_the_simulations_nor_the_server():
    """Importing the ClientApp (what a SuperNode runs) and the package face loads nothing of the
    layers above the client, nor the server."""
    code = ("import sys, fedtrak, fedtrak.client.app; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('fedtrak.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "simulations" not in out and "server" not in out, out


def test_an_old_module_name_is_refused_with_its_new_place():
    """Code written against 0.2's flat modules gets an error naming the new module (and the
    package's own name for it), and every new place exists."""
    import importlib

    import fedtrak

    with pytest.raises(ModuleNotFoundError, match=r"fedtrak\.tasks moved to fedtrak\.data\.tasks .*fedtrak\.Task"):
        importlib.import_module("fedtrak.tasks")
    with pytest.raises(ModuleNotFoundError, match=r"^No module named 'fedtrak\.nothing'"):
        importlib.import_module("fedtrak.nothing")
    for new in fedtrak.MOVED.values():
        importlib.import_module(f"fedtrak.{new}")
