"""The documentation: a README that is a landing page, docs that link only inside the repository,
and a command reference that matches the parser."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A Markdown link or image: ``[text](target)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    files = [ROOT / line for line in out.splitlines()] if out else [p for p in ROOT.rglob("*") if ".venv" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in {".md", ".py", ".toml", ".txt", ".cfg", ".yml", ""}]


def test_the_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, len(text)
    for page in ("design", "privacy", "deploy", "own-model", "evaluation", "results", "cli"):
        assert f"(docs/{page}.md)" in text


def test_every_link_of_the_docs_resolves_inside_the_repository():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_nothing_refers_to_a_file_outside_the_repository():
    outside = re.compile(r"\.\./shared|DESIGN\.md|\]\(\.\./\.\.")
    found = [str(p.relative_to(ROOT)) for p in _tracked() if p.exists() and outside.search(p.read_text(errors="ignore"))
             and p.name != "test_docs.py"]
    assert not found, found


def test_the_command_reference_matches_the_parser():
    from fedtrak.simulations.cli.docs import cli_markdown

    assert (ROOT / "docs" / "cli.md").read_text() == cli_markdown(), \
        "docs/cli.md is out of date: python -m fedtrak.simulations.cli.docs docs/cli.md"


def _run_config(text: str) -> dict:
    """A ``--run-config`` string as Flower reads it: ``key=value`` pairs, TOML values."""
    import shlex
    import tomllib

    flat = {}
    for item in shlex.split(text):
        key, value = item.split("=", 1)
        try:
            flat[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:  # a path whose quotes the shell took off
            flat[key] = value
    return flat


def test_the_deploy_walkthrough_runs_private_and_warns_about_runs_without_noise():
    """Every device charges each run to its ledger, and a run without noise at unbounded epsilon:
    the walk-through's own runs add noise (and pass the server's checks), and its first step says
    what a run without noise does to a budget set later."""
    from fedtrak.config.settings import Settings
    from fedtrak.server.preflight import preflight

    text = (ROOT / "docs" / "deploy.md").read_text()
    step1 = text.split("**1. Operator")[1].split("**2. Each device")[0]
    assert "unbounded" in step1 and "epsilon" in step1 and "`privacy-budget`" in step1
    runs = re.findall(r'flwr run \. mylink --stream --run-config "([^"]*)"', text)
    assert runs
    for config in runs:
        settings = Settings.from_flat(_run_config(config))
        assert settings.privacy.wants_noise, f"docs/deploy.md runs without noise: {config}"
        assert preflight(settings).dp.active


def test_the_release_table_of_the_privacy_page_is_the_release_kinds_own():
    from fedtrak.privacy.kinds import release_table

    assert release_table() in (ROOT / "docs" / "privacy.md").read_text(), \
        "docs/privacy.md's release table differs from shared/privacy/kinds.py: paste release_table()"


def test_the_privacy_page_names_the_noise_source_the_code_uses():
    """Audit finding 11: the page said the noise came from numpy's generator; it is a ChaCha20 stream."""
    text = (ROOT / "docs" / "privacy.md").read_text()
    assert "numpy's generator" not in text and "ChaCha20" in text


def test_the_custom_output_example_of_own_model_runs(tmp_path, monkeypatch):
    """own-model.md's worked ``ModelOutput`` (a one-logit binary classifier) runs as printed: its
    task is built, two checkpoints trained with its loss, and the scores are finite and not all 0."""
    import numpy as np

    text = (ROOT / "docs" / "own-model.md").read_text()
    block = re.search(r"<!-- tested: custom-output -->\n```python\n(.*?)```", text, re.DOTALL)
    assert block, "own-model.md lost its tested custom-output example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "own-model.md", "exec"), scope)  # noqa: S102 - the page's own example
    result = scope["result"]
    assert result.summary.num_checkpoints == 2 and result.scores.shape == (40, 160)
    assert np.all(np.isfinite(result.scores)) and np.abs(result.scores).max() > 0
    assert "central run of binary" in repr(result)


def _tested_block(page: str, name: str) -> list[str]:
    """The command lines of a page's ``<!-- tested: NAME -->`` bash block."""
    block = re.search(rf"<!-- tested: {name} -->\n```bash\n(.*?)```", (ROOT / "docs" / page).read_text(), re.DOTALL)
    assert block, f"{page} lost its tested {name} block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_deploy_data_recipes_give_each_of_three_devices_its_own_share(tmp_path):
    """docs/deploy.md's step 2 recipes, run as printed in a device's folder for DEVICE 0, 1, 2 of
    DEVICES=3: the shares of the built-in digits and of the own app's wine data are disjoint and
    cover the training set, and the app's device check takes the wine file by the app's task."""
    import os

    import numpy as np

    from fedtrak.data.tasks import load_task

    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for name, size in (("device-data", load_task("digits-logreg").num_train), ("app-data", 150)):
        lines = _tested_block("deploy.md", name)
        rows, said = [], ""
        for device in range(3):
            env = {**os.environ, "DEVICE": str(device), "DEVICES": "3", "PWD": str(tmp_path)}
            for line in lines[:1] if device else lines:  # the app's check once
                done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=300, check=False)
                assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
                said += done.stdout
            with np.load(tmp_path / "mine.npz") as data:
                rows.append(len(data["y"]))
                assert data["x"].shape[0] == len(data["y"]) and len(data["y"]) >= size // 3
        assert sum(rows) == size, (name, rows)
        if name == "app-data":
            assert "task wine-mlp: 50 examples of shape [13], labels [0, 1, 2]" in said, said
            assert "owner total per query: shape [28]" in said  # the app's own query count
