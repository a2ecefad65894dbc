"""The package itself: one import name when installed, one wire format, one settings model, a lint
rule against the folders' bare names, and files of a readable size."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedtrak import wire
from fedtrak.config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shared", "server", "client", "simulations")
WIRE = ROOT / "shared" / "wire"
#: Flower's record types and a message's record views: only the wire format touches them.
RECORD_NAMES = {"ArrayRecord", "ConfigRecord", "MetricRecord", "Array"}
RECORD_VIEWS = {"array_records", "config_records", "metric_records"}


def _sources() -> list[Path]:
    return [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")]


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_message_key_or_record_access_outside_the_wire_format():
    """Every message key lives in :mod:`fedtrak.wire`: no other module spells a message type or a
    record key, imports Flower's record types or reads a message's records itself (so the keys
    inside records cannot be spelled elsewhere either)."""
    keys = set(wire.KEYS)
    assert len(keys) == len(wire.KEYS) and all(k.startswith(("fedtrak.", "query.")) for k in keys)
    problems = []
    for path in _sources():
        if WIRE in path.parents:
            continue
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        for node in _string_constants(tree):
            if node.value in keys or any(node.value.startswith(k) for k in keys if k.endswith("-")):
                problems.append(f"{where}:{node.lineno}: message key {node.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr"):
                problems += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names if a.name in RECORD_NAMES]
            if isinstance(node, ast.Attribute) and node.attr in RECORD_VIEWS:
                problems.append(f"{where}:{node.lineno}: reads .{node.attr}")
    assert not problems, "\n".join(problems)


def test_the_scan_finds_a_spelled_key(tmp_path):
    """The check above fails on a module that spells a key (it is not vacuous)."""
    tree = ast.parse(f"content[{wire.KEYS[-4]!r}] = record\nx = content.config_records\n")
    spelled = [n.value for n in _string_constants(tree) if n.value in set(wire.KEYS)]
    assert spelled == [wire.KEYS[-4]]
    assert any(isinstance(n, ast.Attribute) and n.attr in RECORD_VIEWS for n in ast.walk(tree))


def test_pyproject_run_config_is_the_settings_flat_form():
    """``[tool.flwr.app.config]`` is derived from the settings model (every key, every default)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == Settings().flat()
    assert Settings.from_flat(declared) == Settings()


def test_no_file_is_longer_than_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources() + list((ROOT / "tests").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_bare_folder_imports_are_refused_by_the_lint_rule(tmp_path):
    """ruff's banned-api rule (pyproject.toml) refuses ``import server`` and friends."""
    bad = tmp_path / "bad.py"
    bad.write_text("".join(f"import {name}\n" for name in FOLDERS) + "from server.app import app\n")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                           "--select", "TID251", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stdout.count("TID251") == 5, proc.stdout


def test_the_repository_passes_its_lint():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_wheel_installs_one_import_name(tmp_path):
    """Build the wheel, install it (without dependencies, which come from this environment) into a
    fresh virtual environment outside the repository, and import it there: ``fedtrak`` and its
    parts load from the wheel, and ``server``, ``client``, ``shared`` and ``simulations`` do not
    exist."""
    dist, source = tmp_path / "dist", tmp_path / "source"  # built from a copy: no build/ left in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(source)], check=True, cwd=tmp_path, capture_output=True)
    wheel = next(dist.glob("fedtrak-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedtrak"}, tops
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {_installed_name(p) for p in _sources()}
    assert expected <= shipped, sorted(expected - shipped)

    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "deps.pth").write_text(f"{deps}\n")  # torch, flwr, ...; not this checkout's editable finder
    check = (
        "import importlib.util, fedtrak, fedtrak.server.app, fedtrak.client.app, fedtrak.simulations.cli\n"
        f"assert fedtrak.__file__.startswith({str(site)!r}), fedtrak.__file__\n"
        "assert [n for n in ('server', 'client', 'shared', 'simulations') if importlib.util.find_spec(n)] == []\n"
        "assert fedtrak.attribute.__module__ == 'fedtrak.simulations.api'\n"
        "print('ok')\n")
    # -I: isolated from this process's PYTHONPATH (Ray sets one to the checkout) and the user site
    proc = subprocess.run([str(python), "-I", "-c", check], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _installed_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    prefix = {"shared": ["fedtrak"], "server": ["fedtrak", "server"], "client": ["fedtrak", "client"],
              "simulations": ["fedtrak", "simulations"]}[rel.parts[0]]
    return "/".join([*prefix, *rel.parts[1:]])
