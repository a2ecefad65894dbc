"""``fedtrak simulate`` end to end from the command line: FedAvg checkpoints trained through
Flower, private attribution, and the same checkpoints reproduced by ``fedtrak attribute``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrak.data.checkpoints import load_checkpoints
from fedtrak.data.partition import partition
from fedtrak.data.tasks import load_task
from fedtrak.simulations.cli import main
from fedtrak.simulations.evaluation.retrain import fedavg_in_process

pytestmark = pytest.mark.flower


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            kids.append(int(stat.parent.name))
    return kids


def test_simulate_trains_fedavg_checkpoints_that_attribute_reproduces(tmp_path, capsys, own_ray_lifecycle):
    sim = tmp_path / "sim"
    code = main(["simulate", "--clients", "4", "--partition", "dirichlet", "--checkpoints", "2",
                 "--rounds", "3", "--local-epochs", "2", "--proj-dim", "256", "--out", str(sim), "--quiet",
                 "--ensemble", "independent"])
    printed = capsys.readouterr().out
    assert code == 0
    # Short-lived helpers (a `file` call, say) may come and go; a leftover is one that stays.
    deadline = time.monotonic() + 20
    while _children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.5)
    before = set(_children(os.getpid()))
    time.sleep(2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in before & set(_children(os.getpid()))}
    assert not left, f"simulate left processes behind: {left}"
    assert "private mode, release owner-totals, 4 owners" in printed and "bytes per client" in printed
    manifest = json.loads((sim / "checkpoints" / "manifest.json").read_text())
    assert [c["algorithm"] for c in manifest["checkpoints"]] == ["fedavg", "fedavg"]
    assert [c["rounds"] for c in manifest["checkpoints"]] == [3, 3]
    assert all(c["accuracy"] > 0.8 for c in manifest["checkpoints"])  # 10 classes: chance is 0.1
    summary = json.loads((sim / "summary.json").read_text())
    assert summary["bytes"]["per_step"]["train"]["sent"] > 0  # FedAvg's messages are counted too
    assert {"train", "featurize_round", "score_round", "kernel"} <= set(summary["seconds"])
    assert not (sim / "scores.npy").exists()  # owner totals only

    # Ground-truth retraining repeats this FedAvg in-process: the same models, to float32 round-off.
    task = load_task("digits-logreg")
    parts = partition(task.y_train, 4, "dirichlet", 0.5, 0)
    for m, (_, state) in enumerate(load_checkpoints(task, sim / "checkpoints")):
        replica = fedavg_in_process(task, parts.clients, rounds=3, local_epochs=2, init_seed=m, seed=0,
                                    checkpoint=m).state_dict()
        for name, value in state.items():
            np.testing.assert_allclose(replica[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-5)
    # ... so owner-level LDS of a FedAvg run retrains with FedAvg over the chosen owners.
    assert main(["evaluate", str(sim), "--owner-subsets", "6", "--cache-dir", str(tmp_path / "gt"),
                 "--quiet", "--no-ceiling"]) == 0
    owner_lds = json.loads((sim / "summary.json").read_text())["evaluation"]["owner_lds"]
    assert owner_lds["ground_truth"]["algorithm"] == "fedavg" and owner_lds["ground_truth"]["rounds"] == 3
    assert owner_lds["ground_truth"]["epochs"] == 2 and owner_lds["num_subsets"] == 6
    assert "lds" not in json.loads((sim / "summary.json").read_text())["evaluation"]  # no scores released

    central = tmp_path / "central"
    assert main(["attribute", "--clients", "4", "--partition", "dirichlet", "--proj-dim", "256",
                 "--checkpoints", "2", "--checkpoint-dir", str(sim / "checkpoints"), "--out", str(central),
                 "--quiet"]) == 0
    want = np.load(central / "owner_scores.npy")
    np.testing.assert_allclose(np.load(sim / "owner_scores.npy"), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("flags, message", [
    (["--mode", "trusted"], "argument --mode: invalid choice"),
    (["--policy", "everything"], "argument --policy: invalid choice"),
    (["--rounds", "0"], "argument --rounds: rounds must be an integer >= 1, got 0"),
    (["--timeout", "-1"], "argument --timeout: timeout must be a number > 0, got -1.0"),
])
def test_simulate_bad_flags_exit_2_with_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtrak: error:") and message in err and len(err.splitlines()) == 1


def test_simulate_bad_task_fails_before_starting_flower(tmp_path, capsys):
    assert main(["simulate", "--task", "nope", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fedtrak: error:" in err and "nope" in err


def test_dp_sgd_training_is_accounted_and_composed_with_the_attribution(tmp_path, capsys):
    """Clients train with DP-SGD (Opacus) inside Flower's FedAvg rounds, then release noised
    attribution (epsilon 4): the run reports the training epsilon per client and both composed,
    which matches Opacus's own RDP accountant over the same history."""
    from opacus.accountants import RDPAccountant

    sim = tmp_path / "dpsgd"
    assert main(["simulate", "--clients", "2", "--checkpoints", "1", "--rounds", "2", "--local-epochs", "1",
                 "--proj-dim", "64", "--dp-train-noise", "1.0", "--dp-train-clip", "1.0", "--epsilon", "4",
                 "--out", str(sim), "--quiet"]) == 0
    assert "training (DP-SGD): epsilon up to" in capsys.readouterr().out
    summary = json.loads((sim / "summary.json").read_text())
    training, privacy = summary["training_privacy"], summary["privacy"]
    assert training["dp_sgd"] and training["noise_multiplier"] == 1.0
    eps = list(training["epsilon_per_client"].values())
    assert len(eps) == 2 and all(0 < e < 1000 for e in eps) and training["epsilon_max"] == max(eps)
    # the attribution is sized for 4; at a given DP-SGD noise the whole run is both composed
    assert privacy["dp"] and privacy["epsilon_attribution"] == pytest.approx(4.0, rel=1e-3)
    assert privacy["epsilon"] == pytest.approx(training["epsilon_with_attribution_max"])
    for owner in summary["owners"]:
        n = owner["num_examples"]  # as released (noised), as the summary's training account uses it
        acc = RDPAccountant()
        acc.history = [(1.0, 64 / n, 2 * -(-n // 64))] + [(r["sigma"], 1.0, r["count"]) for r in privacy["ledger"]]
        both = training["epsilon_with_attribution_per_client"][owner["owner"]]
        assert both == pytest.approx(acc.get_epsilon(delta=1e-5), rel=0.02)
        assert max(4.0, training["epsilon_per_client"][owner["owner"]]) < both
    manifest = json.loads((sim / "checkpoints" / "manifest.json").read_text())
    assert manifest["checkpoints"][0]["algorithm"] == "fedavg-dp-sgd"
    # ground truth repeats the noisy recipe: DP-SGD at each device's noise multiplier, fresh noise
    from fedtrak.simulations.evaluation.retrain import train_on_subset
    from fedtrak.simulations.run_folder import RunFolder

    recipe = RunFolder.open(sim).recipe()
    assert (recipe.algorithm, recipe.dp_sigmas, recipe.dp_clip, recipe.rounds) == ("fedavg-dp-sgd", (1.0, 1.0), 1.0, 2)
    mask = np.zeros(recipe.load()[0].num_train, dtype=bool)
    mask[::2] = True
    a, b = (train_on_subset(recipe, mask, seed=0).state_dict()["1.weight"] for _ in range(2))
    assert not torch.equal(a, b)  # the same subset and seed, but DP-SGD's noise is the device's own


def test_the_main_job_ends_with_its_answer_and_prints_each_line_once(tmp_path):
    """``fedtrak simulate --epsilon 1`` as a user runs it (a subprocess, output not a terminal): it ends
    with the top owners of at least three queries, the privacy line and the next commands; no line
    appears twice, and neither Ray's actor warnings nor any other warning shows without --verbose, nor a
    progress bar (tests/test_pty.py runs the same command in a pseudo-terminal).
    The README's privacy paragraph holds: the training is DP-SGD inside the account, the whole run
    costs at most 1 with nothing left uncovered, and every device's ledger charged exactly that."""
    out = tmp_path / "sim"
    proc = subprocess.run([sys.executable, "-m", "fedtrak.simulations.cli", "simulate", "--clients", "3",
                           "--checkpoints", "1", "--rounds", "2", "--local-epochs", "1", "--proj-dim", "64",
                           "--epsilon", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    assert "ClientAppActor" not in text and "WARNING" not in text and "Warning" not in text, text
    assert "FedAvg rounds" not in text and "\r" not in text, text  # piped: no progress bar (tests/test_pty.py)
    tail = proc.stdout.splitlines()
    start = tail.index("top owners per query (share of the positive attribution):")
    queries = [line for line in tail[start:] if line.startswith("  query ")]
    # at epsilon 1 the owners' totals carry fresh device noise: an owner raises a query, or none does
    assert len(queries) >= 3, tail[start:]
    assert all(re.fullmatch(r"  query \d+: (owner \S+ \d+%(, owner \S+ \d+%)*|no owner raises it)(; .*)?", q)
               for q in queries), queries
    assert any(line.startswith("privacy: epsilon 1 at delta 1e-05 for the whole run (sigma ") for line in tail)
    assert tail[-1] == f"next: fedtrak report {out} | fedtrak evaluate {out} | fedtrak attack {out}"
    summary = json.loads((out / "summary.json").read_text())
    privacy, training = summary["privacy"], summary["training_privacy"]
    assert training["dp_sgd"] and privacy["not_covered"] == [] and privacy["epsilon"] <= 1.0
    assert privacy["epsilon_attribution"] == pytest.approx(0.25, rel=1e-6)  # train-share 0.75
    ledgers = sorted((out / "client-stores").glob("*/privacy-ledger.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        (run,) = json.loads(path.read_text())["charges"]
        assert run["epsilon"] == pytest.approx(run["planned_epsilon"]) and 0.99 < run["epsilon"] <= 1.0 + 1e-9
        assert {"update-0-1", "update-0-2", "count", "summary-0"} <= {r["item"] for r in run["releases"]}
