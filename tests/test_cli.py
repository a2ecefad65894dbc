"""``fedtrak attribute`` end to end, and its handling of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedtrak.data.partition import partition
from fedtrak.data.tasks import load_task
from fedtrak.simulations.cli import main
from fedtrak.trak.scoring import owner_totals


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job: ``fedtrak attribute`` with every default, as a subprocess."""
    out = tmp_path_factory.mktemp("default") / "run"
    proc = subprocess.run([sys.executable, "-m", "fedtrak.simulations.cli", "attribute", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow  # shares the 10 s default run
def test_default_run_writes_complete_consistent_outputs(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["complete"] is True
    assert (summary["task"], summary["proj_dim"], summary["num_checkpoints"]) == ("digits-logreg", 512, 3)
    assert all(lam > 0 for lam in summary["lambda"])
    assert {"train", "featurize_train", "kernel", "score", "total"} <= set(summary["seconds"])
    scores = np.load(default_run / "scores.npy")
    ids = np.load(default_run / "example_ids.npy")
    owners = np.load(default_run / "owner_scores.npy")
    assert scores.shape == (149, 1500) and np.isfinite(scores).all()
    assert owners.shape == (149, 10)
    expected = partition(load_task("digits-logreg").y_train, 10, "iid", seed=0)
    np.testing.assert_array_equal(ids["index"], expected.order())
    np.testing.assert_allclose(owners, owner_totals(scores.astype(np.float64), ids["client"], 10),
                               rtol=1e-5, atol=1e-8)
    idx = np.load(default_run / "topk_indices.npy")
    top = np.load(default_run / "topk_scores.npy")
    np.testing.assert_allclose(top[:, 0], scores.max(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(np.take_along_axis(scores, idx, 1), top)
    assert not list(default_run.glob(".staging-*"))


@pytest.mark.slow  # shares the 10 s default run
def test_checkpoint_dir_reuse_reproduces_scores(default_run, tmp_path):
    out = tmp_path / "again"
    code = main(["attribute", "--out", str(out), "--quiet",
                 "--checkpoint-dir", str(default_run / "checkpoints")])
    assert code == 0
    assert "load_checkpoints" in json.loads((out / "summary.json").read_text())["seconds"]
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(default_run / "scores.npy"))


@pytest.mark.slow  # shares the 10 s default run
def test_dirichlet_owners_follow_the_partition(default_run, tmp_path):
    out = tmp_path / "dir"
    assert main(["attribute", "--out", str(out), "--quiet", "--checkpoints", "1", "--proj-dim", "64",
                 "--clients", "4", "--partition", "dirichlet", "--alpha", "0.3",
                 "--checkpoint-dir", str(default_run / "checkpoints")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"]["scheme"] == "dirichlet" and len(summary["partition"]["client_sizes"]) == 4
    assert np.load(out / "owner_scores.npy").shape == (149, 4)


def _fails(argv, capsys, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fedtrak: error: ") and "\n" not in err and match in err, err


@pytest.mark.slow  # shares the 10 s default run
def test_bad_inputs_give_one_line_errors_and_no_results(default_run, tmp_path, capsys):
    out = tmp_path / "bad"
    ckpts = str(default_run / "checkpoints")
    _fails(["attribute", "--out", str(out), "--task", "nope"], capsys, "unknown task 'nope'")
    _fails(["attribute", "--out", str(out), "--projector", "identity", "--proj-dim", "64",
            "--checkpoint-dir", ckpts], capsys, "needs --proj-dim equal to the number of parameters (650)")
    _fails(["attribute", "--out", str(out), "--proj-dim", "1000", "--checkpoint-dir", ckpts], capsys,
           "--proj-dim 1000 exceeds the model's 650 parameters")
    _fails(["attribute", "--out", str(out), "--task", "digits-mlp", "--checkpoint-dir", ckpts], capsys,
           "trained for task digits-logreg")
    _fails(["attribute", "--out", str(out), "--lambda", "-3", "--checkpoint-dir", ckpts, "--quiet"],
           capsys, "lambda must be positive")
    nan_dir = tmp_path / "nan"
    shutil.copytree(ckpts, nan_dir)
    state = torch.load(nan_dir / "ckpt_001.pt", weights_only=True)
    state["1.weight"][0, 0] = float("nan")
    torch.save(state, nan_dir / "ckpt_001.pt")
    _fails(["attribute", "--out", str(out), "--checkpoint-dir", str(nan_dir), "--quiet"], capsys,
           "has NaN or infinite weights in ['1.weight']")
    assert not (out / "summary.json").exists() and not (out / "scores.npy").exists()
    assert not list(out.glob(".staging-*"))


@pytest.mark.parametrize("flag", [["--proj-dim", "0"], ["--proj-dim", "abc"], ["--clients", "-1"]])
def test_bad_flags_exit_non_zero_with_one_line(flag, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtrak.simulations.cli", "attribute", "--out",
                           str(tmp_path / "x"), *flag], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtrak: error: argument"), proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # shares the 10 s default run
def test_failed_rerun_keeps_the_previous_complete_result(default_run, tmp_path, capsys):
    out = tmp_path / "keep"
    ckpts = str(default_run / "checkpoints")
    assert main(["attribute", "--out", str(out), "--quiet", "--checkpoint-dir", ckpts]) == 0
    before = np.load(out / "scores.npy")
    _fails(["attribute", "--out", str(out), "--quiet", "--checkpoint-dir", ckpts, "--lambda", "0"],
           capsys, "lambda must be positive")
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    np.testing.assert_array_equal(np.load(out / "scores.npy"), before)


@pytest.mark.slow
def test_bench_featurize_smoke(capsys):
    assert main(["bench", "featurize", "--proj-dim", "64", "--examples", "32",
                 "--traker-examples", "8"]) == 0
    table = capsys.readouterr().out
    assert "fedtrak rademacher, warm" in table and "fedtrak factorized, warm" in table and "traker" in table


@pytest.mark.slow  # shares the 10 s default run
def test_factorized_projector_runs_end_to_end_and_differs_from_dense(default_run, tmp_path):
    """The default projector (auto) is the factorized one for the default task's linear model; the
    dense one through attribute on the same checkpoints gives other scores, finite and
    rank-correlated with the factorized run's."""
    from scipy.stats import spearmanr

    default = json.loads((default_run / "summary.json").read_text())
    assert default["projector"] == "factorized" and default["proj_dim"] == 512
    assert default["settings"]["projection"]["projector"] == "auto"
    out = tmp_path / "dense"
    assert main(["attribute", "--out", str(out), "--quiet", "--projector", "rademacher",
                 "--checkpoint-dir", str(default_run / "checkpoints")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["projector"] == "rademacher" and summary["proj_dim"] == 512
    dense, got = np.load(out / "scores.npy"), np.load(default_run / "scores.npy")
    assert got.shape == dense.shape and np.all(np.isfinite(got)) and not np.allclose(got, dense)
    assert np.median([spearmanr(a, b)[0] for a, b in zip(got[:20], dense[:20])]) > 0.5


def test_the_answer_names_top_owners_with_their_shares_and_top_examples(tmp_path):
    """The end of a run's output, from its run folder: shares of the positive attribution, the best
    examples where scores were released, the privacy line and the next commands."""
    from fedtrak.results.answer import answer_lines, owner_shares
    from fedtrak.results.summary import RunSummary

    np.testing.assert_allclose(owner_shares(np.array([3.0, 1.0, -2.0])), [0.75, 0.25, 0.0])
    np.save(tmp_path / "owner_scores.npy", np.array([[3.0, 1.0, -2.0], [-1.0, -1.0, -1.0]]))
    np.save(tmp_path / "topk_indices.npy", np.array([[4, 0], [1, 2]]))
    ids = np.zeros(5, dtype=[("client", "i8"), ("local", "i8"), ("index", "i8")])
    ids["client"], ids["index"] = [0, 0, 1, 1, 2], [10, 11, 12, 13, 14]
    np.save(tmp_path / "example_ids.npy", ids)
    owners = [{"column": i, "owner": o, "node_id": i, "partition_id": i, "num_examples": 1} for i, o in enumerate("abc")]
    summary = RunSummary({"mode": "private", "owners": owners, "privacy": {"dp": False, "kernel_source": "private"}})
    lines = answer_lines(tmp_path, summary)
    assert lines[1] == "  query 0: owner a 75%, owner b 25%; top examples: #14 (owner c), #10 (owner a)"
    assert lines[2] == "  query 1: no owner raises it; top examples: #11 (owner a), #12 (owner b)"
    assert lines[3].startswith("privacy: no noise")
    assert lines[4] == f"next: fedtrak report {tmp_path} | fedtrak evaluate {tmp_path} | fedtrak attack {tmp_path}"
