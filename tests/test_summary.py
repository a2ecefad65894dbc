"""The run summary has one owner, :mod:`fedtrak.results.summary`: it alone spells the keys of
``summary.json``, builds it for both kinds of run, writes its version and reads it back (refusing
what it cannot read, by name)."""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from fedtrak.config.settings import Settings
from fedtrak.data.checkpoints import CheckpointInfo
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release
from fedtrak.results import summary as owner
from fedtrak.results.summary import (
    KEYS,
    SUMMARY,
    VERSION,
    Clients,
    Excluded,
    Federated,
    Flips,
    Owner,
    Partition,
    Privacy,
    RunSummary,
    build,
    load,
    save,
)
from fedtrak.timing import PhaseTimer
from fedtrak.wire.job import Resolved

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shared", "server", "client", "simulations")
OWNER = ROOT / "shared" / "results" / "summary.py"
#: What a module imports when it builds a summary (rule 2 below applies to it).
BUILDING = {"build", "build_failed", "ResultWriter", "Owner", "Excluded", "Partition", "Flips", "Resumed",
            "Clients", "Privacy", "Federated"}
#: The top-level keys only a federated run writes.
FEDERATED_ONLY = {"release_policy", "run_id", "owners", "clients", "excluded", "complete_federation", "bytes",
                  "client_seconds", "client_peak_memory_mb", "kernel_source", "privacy", "training_privacy",
                  "server_cpu_seconds"}


def _key(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _names_a_summary(expr: ast.AST) -> bool:
    """Whether an expression reads from something named a summary (``summary``, ``run.summary``,
    ``summary["privacy"]``, ``self.summary.get(...)``, ``old_summary``)."""
    return any("summary" in (n.id if isinstance(n, ast.Name) else n.attr).lower()
               for n in ast.walk(expr) if isinstance(n, (ast.Name, ast.Attribute)))


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and _key(node.body[0].value) is not None}


def spelled_summary_keys(tree: ast.AST, where: str) -> list[str]:
    """Where a module's code spells the summary (the rules: :func:`test_no_summary_key_is_spelled_outside_its_module`)."""
    found = []
    builds = any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fedtrak.results.")
                 and any(a.name in BUILDING for a in n.names) for n in ast.walk(tree))
    docs = _docstrings(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.Subscript) and _key(n.slice) in KEYS and _names_a_summary(n.value):
            found.append(f"{where}:{n.lineno}: reads {_key(n.slice)!r} of a summary by hand")
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("get", "pop", "setdefault")
                and n.args and _key(n.args[0]) in KEYS and _names_a_summary(n.func.value)):
            found.append(f"{where}:{n.lineno}: reads {_key(n.args[0])!r} of a summary by hand")
        if builds and isinstance(n, ast.Dict):
            found += [f"{where}:{n.lineno}: builds summary key {_key(k)!r}" for k in n.keys if _key(k) in KEYS]
        if builds and isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and _key(n.slice) in KEYS:
            found.append(f"{where}:{n.lineno}: sets summary key {_key(n.slice)!r}")
        if _key(n) == SUMMARY and id(n) not in docs:
            found.append(f"{where}:{n.lineno}: names {SUMMARY} (open it with fedtrak.results.summary.load)")
    return found


def test_no_summary_key_is_spelled_outside_its_module():
    """Only :mod:`fedtrak.results.summary` spells the summary's keys (its ``KEYS``: the top-level
    keys, the keys it adds to checkpoint records, and its typed blocks' fields). Anywhere else in
    server/, client/, shared/ and simulations/:

    1. no subscript or ``.get``/``.pop``/``.setdefault`` with a summary key as a string literal on an
       expression that names a summary (an identifier containing ``summary``): readers use the
       accessors of :class:`RunSummary`;
    2. in a module that builds a summary (it imports ``ResultWriter``, a builder or a typed block),
       no dict literal key and no subscript assignment with a summary key: it hands typed values to
       the builder;
    3. no code (docstrings aside) names ``summary.json``: the folder's summary is opened by ``load``.

    Common words such as ``mode`` or ``seconds`` stay free as keys of other dicts (a sweep's row, an
    attack's block) in modules that neither name a summary nor build one."""
    keys = set(owner.TOP_KEYS) | {"scheme", "num_flipped", "noise_multiplier", "epsilon", "partition_id"}
    assert keys <= KEYS  # the scan's key set is the module's own and covers its blocks
    problems = []
    for path in (p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")):
        if path != OWNER:
            problems += spelled_summary_keys(ast.parse(path.read_text()), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_scan_finds_a_spelled_summary_key():
    """The check above fails on modules that spell the summary (it is not vacuous), and leaves
    other dicts with the same words alone."""
    reader = ("n = summary['num_train']\neps = run.summary.get('privacy')\nx = json.loads((out / 'summary.json').read_text())\n"
              "row = {'mode': 1, 'seconds': 2}\nblock['mode'] = 3\n")
    found = sorted(spelled_summary_keys(ast.parse(reader), "reader.py"))
    assert [f.split(": ", 1)[1] for f in found] == [
        "reads 'num_train' of a summary by hand", "reads 'privacy' of a summary by hand",
        "names summary.json (open it with fedtrak.results.summary.load)"]
    builder = "from fedtrak.results.folder import ResultWriter\nsummary = {'mode': 'central', 'n': 1}\nd['owners'] = []\n"
    assert [f.split(": ", 1)[1] for f in sorted(spelled_summary_keys(ast.parse(builder), "builder.py"))] == [
        "builds summary key 'mode'", "sets summary key 'owners'"]


def _records() -> tuple[list[dict], list[CheckpointInfo]]:
    return ([{"checkpoint": m, "lambda": 0.1 * (m + 1), "num_params": 650, "proj_dim": 64} for m in range(2)],
            [CheckpointInfo(m, f"ckpt_{m:03d}.pt", m, "central-sgd", 3, 0.9) for m in range(2)])


def _central() -> RunSummary:
    records, infos = _records()
    return build(Settings(), Resolved(64), "digits-logreg", 100, 20, records, infos,
                 Partition("iid", None, 0, 2, (50, 50)), Flips(0.1, (0,), 0, 5), PhaseTimer())


def _federated(privacy: Privacy, excluded: tuple[Excluded, ...] = ()) -> RunSummary:
    records, infos = _records()
    clients = Clients(({"node_id": 7, "owner": "0"}, {"node_id": 8, "owner": "1"}), excluded, 10, 20,
                      {"train": {"sent": 4, "received": 2}}, {"featurize": 0.5}, {"0": 100.0})
    fed = Federated("run-1", (Owner(0, "0", 7, 0, 50), Owner(1, "1", 8, 1, 50)), clients, "private", privacy,
                    {"dp_sgd": False, "how": "given checkpoints"})
    return build(Settings(), Resolved(64), "digits-logreg", 100, 20, records, infos,
                 Partition("iid", None, 0, 2), Flips(0.1, (0,), 0, 5), PhaseTimer(), fed)


NO_NOISE = Privacy(dp=False, kernel_source="private", note="no noise", training="given checkpoints")


def test_a_central_and_a_federated_summary_share_their_keys():
    """One builder: the centralized run's keys are the federated run's, less the federation's own;
    every key written is one the module lists, and blocks both write have the same keys."""
    central, fed = _central().doc, _federated(NO_NOISE).doc
    assert set(central) <= set(fed) and set(fed) - set(central) == FEDERATED_ONLY
    assert set(central) | set(fed) <= KEYS and set(fed["owners"][0]) | set(fed["flips"]) <= KEYS
    for key in ("resolved", "settings", "config", "flips"):
        assert set(central[key]) == set(fed[key]), key
    assert set(central["partition"]) - set(fed["partition"]) == {"client_sizes"}
    assert [set(r) - set(c) for r, c in zip(fed["checkpoints"], central["checkpoints"])] == [
        {"algorithm", "accuracy"}] * 2
    assert central["mode"] == "central" and fed["mode"] == "private" and central["lambda"] == [0.1, 0.2]
    assert fed["bytes"] == {"sent": 10, "received": 20, "per_step": {"train": {"sent": 4, "received": 2}}}
    assert "warning" not in fed and fed["complete_federation"] is True


def test_the_privacy_block_writes_what_applies():
    """Without noise: the kernel's source, a note and the training; with noise, the account, an
    unbounded epsilon as null, and the secure sum's fields only under secure aggregation."""
    assert _federated(NO_NOISE).doc["privacy"] == {"dp": False, "kernel_source": "private", "note": "no noise",
                                                   "training": "given checkpoints"}
    ledger = (Release("Gram", 1.0, 2, "C^2"),)
    noisy = Privacy(dp=True, kernel_source="private", noise_multiplier=1.0, delta=1e-5, epsilon=math.inf,
                    ledger=ledger, not_covered=("x",), training="given checkpoints", epsilon_attribution=3.0)
    block = _federated(noisy).doc["privacy"]
    assert block["epsilon"] is None and block["epsilon_attribution"] == 3.0 and block["not_covered"] == ["x"]
    assert block["ledger"] == [r.describe() for r in ledger] and "note" not in block and "survivors" not in block
    assert "owner_value_clip" not in block and set(block) <= KEYS
    summary = _federated(noisy, (Excluded(9, "2", "timed out"),))
    assert summary.privacy == replace(noisy, epsilon=None) and summary.clients.excluded == (Excluded(9, "2", "timed out"),)
    assert summary.doc["warning"].startswith("1 client(s) excluded") and summary.doc["complete_federation"] is False


def test_a_saved_summary_reads_back_with_its_version(tmp_path):
    summary = _federated(NO_NOISE).marked(True)
    path = save(summary, tmp_path)
    on_disk = json.loads(path.read_text())
    assert on_disk["summary_version"] == VERSION and on_disk["complete"] is True
    again = load(tmp_path)
    assert again.doc == on_disk and again.to_json() == on_disk
    assert (again.owners, again.lambdas, again.partition) == (summary.owners, (0.1, 0.2), Partition("iid", None, 0, 2))
    assert again.flips == Flips(0.1, (0,), 0, 5) and again.owner_labels == ["0", "1"]
    assert again.settings == Settings() and again.resolved == Resolved(64) and not again.dp_settings().active
    (tmp_path / "central").mkdir()
    assert load(save(_central().marked(True), tmp_path / "central").parent).owner_labels == ["0", "1"]


def test_a_summary_without_a_version_is_read_as_the_previous_release_wrote_it(tmp_path):
    """fedtrak 0.2 wrote the same format without ``summary_version``: it reads as version 1."""
    old = {k: v for k, v in _central().marked(True).to_json().items() if k != "summary_version"}
    (tmp_path / SUMMARY).write_text(json.dumps(old))
    summary = load(tmp_path)
    assert summary.complete and summary.num_train == 100 and summary.partition.client_sizes == (50, 50)
    assert save(summary, tmp_path) and json.loads((tmp_path / SUMMARY).read_text())["summary_version"] == VERSION


@pytest.mark.parametrize("text, message", [
    (json.dumps({"summary_version": VERSION + 1, "complete": True}),
     rf"was written by a newer fedtrak \(summary version {VERSION + 1}; this one reads versions 1 to {VERSION}\)"),
    (json.dumps({"summary_version": "2", "complete": True}), "has an unknown summary version '2'"),
    ('{"complete": tr', "cannot read .*summary.json: Expecting value"),
    ("[1, 2]", "is not a run summary: it holds a JSON list, not an object"),
])
def test_a_summary_this_release_cannot_read_is_refused_by_name(tmp_path, text, message):
    (tmp_path / SUMMARY).write_text(text)
    with pytest.raises(FedtrakError, match=message) as err:
        load(tmp_path)
    assert str(tmp_path / SUMMARY) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FedtrakError, match=re.escape(f"{tmp_path / 'elsewhere'} is not a run folder: it has no {SUMMARY}")):
        load(tmp_path / "elsewhere")


def test_the_dp_settings_of_a_run_are_its_jobs():
    """The attack suite takes a run's DP settings from the summary as the run's job made them (no
    defaults typed again): sigma, C and the weight bound resolved, clip mode and delta as set."""
    records, infos = _records()
    settings, resolved = Settings().replaced(delta=1e-6), Resolved(64, noise_multiplier=1.5, clip_norm=2.0,
                                                                    weight_bound=0.25)
    privacy = Privacy(dp=True, kernel_source="private", noise_multiplier=1.5, clip_norm=2.0, delta=1e-6)
    fed = Federated("run-2", (), Clients((), (), 0, 0, {}, {}, {}), "private", privacy, {})
    summary = build(settings, resolved, "digits-logreg", 100, 20, records, infos, None, None, PhaseTimer(), fed)
    dp = summary.dp_settings()
    assert (dp.noise_multiplier, dp.clip_norm, dp.gram_weight, dp.delta) == (1.5, 2.0, 0.25, 1e-6)
    assert dp.clip_mode == settings.privacy.clip_mode and dp == summary.job().dp()


def test_indexing_a_summary_like_the_old_dict_names_the_accessors():
    """0.2's ``result.summary["mode"]`` gets an error that says how 0.3 reads it."""
    from fedtrak.results.summary import RunSummary

    with pytest.raises(TypeError, match=r"read through its accessors \(summary.mode where it has one\), or "
                                        r"summary.doc\['mode'\]"):
        RunSummary({"mode": "central"})["mode"]
