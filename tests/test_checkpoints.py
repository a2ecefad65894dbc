"""Checkpoint training, manifest, reuse and validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedtrak.data.checkpoints import MANIFEST, load_checkpoints, train_checkpoints, trajectory_steps
from fedtrak.data.tasks import load_task
from fedtrak.errors import FedtrakError


def test_manifest_describes_trained_checkpoints(logreg_ckpt_dir):
    data = json.loads((logreg_ckpt_dir / MANIFEST).read_text())
    assert data["task"] == "digits-logreg"
    entries = data["checkpoints"]
    assert [e["seed"] for e in entries] == [0, 1, 2]
    assert all(e["algorithm"] == "central-sgd" and e["accuracy"] > 0.9 for e in entries)
    assert all((logreg_ckpt_dir / e["file"]).is_file() for e in entries)


def test_training_is_deterministic_in_the_seed(digits_logreg, logreg_states, tmp_path):
    train_checkpoints(digits_logreg, 1, tmp_path, base_seed=0)
    (_, again), = load_checkpoints(digits_logreg, tmp_path)
    for k, v in logreg_states[0].items():
        assert torch.equal(v, again[k])


def test_checkpoint_that_does_not_fit_the_model(logreg_ckpt_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(logreg_ckpt_dir / "ckpt_000.pt", bare / "user.pt")  # no manifest
    with pytest.raises(FedtrakError, match="does not fit the model of task digits-mlp"):
        load_checkpoints(load_task("digits-mlp"), bare)
    with pytest.raises(FedtrakError, match="trained for task digits-logreg, not digits-mlp"):
        load_checkpoints(load_task("digits-mlp"), logreg_ckpt_dir)


def test_corrupt_or_missing_checkpoints(digits_logreg, logreg_ckpt_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(logreg_ckpt_dir, bad)
    (bad / "ckpt_001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedtrakError, match="cannot read checkpoint .*ckpt_001.pt"):
        load_checkpoints(digits_logreg, bad)
    with pytest.raises(FedtrakError, match="holds 3 checkpoints, 5 requested"):
        load_checkpoints(digits_logreg, logreg_ckpt_dir, 5)
    (bad / MANIFEST).write_text("{broken")
    with pytest.raises(FedtrakError, match="corrupt checkpoint manifest"):
        load_checkpoints(digits_logreg, bad)
    with pytest.raises(FedtrakError, match="does not exist"):
        load_checkpoints(digits_logreg, tmp_path / "nowhere")


def test_a_one_run_ensemble_takes_the_last_epochs_of_one_training(digits_logreg, logreg_states, tmp_path):
    """``trajectory``: one model (seed 0) saved after each of its last M epochs; its last checkpoint
    is the independent run of seed 0 (the same training, to the bit), and ground truth retrains
    that whole run."""
    from fedtrak.simulations.run_folder import RunFolder

    infos = train_checkpoints(digits_logreg, 4, tmp_path / "checkpoints", base_seed=0, trajectory=True)
    epochs = digits_logreg.training.epochs
    assert [i.epochs for i in infos] == list(range(epochs - 3, epochs + 1)) and all(i.trajectory for i in infos)
    states = [s for _, s in load_checkpoints(digits_logreg, tmp_path / "checkpoints")]
    for k, v in logreg_states[0].items():
        assert torch.equal(states[-1][k], v)
    assert not torch.equal(states[0]["1.weight"], states[-1]["1.weight"])
    (tmp_path / "summary.json").write_text(json.dumps({
        "complete": True, "num_checkpoints": 4, "config": {"task": "digits-logreg"},
        "partition": {"scheme": "iid", "num_clients": 10, "seed": 0}}))
    recipe = RunFolder.open(tmp_path).recipe()
    assert (recipe.algorithm, recipe.epochs) == ("central-sgd", epochs)
    # fewer epochs than checkpoints: evenly spaced steps over the last half of training
    assert trajectory_steps(5, 3, 79) == [145, 168, 191, 214, 237]  # 23 steps apart
    with pytest.raises(FedtrakError, match="needs at least 300 SGD steps, training has 237"):
        trajectory_steps(300, 3, 79)
