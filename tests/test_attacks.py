"""The attack suite: the attacks succeed where nothing protects the data, and DP at epsilon 1
stops them (no better than the class-mean baseline; membership below the accounted epsilon)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtrak.errors import FedtrakError
from fedtrak.privacy.mechanisms import DPSettings
from fedtrak.simulations.attacks import metrics
from fedtrak.simulations.attacks.bench import attack_dp
from fedtrak.simulations.attacks.conclusion import attack_conclusion
from fedtrak.simulations.attacks.inversion import InversionSettings
from fedtrak.simulations.attacks.suite import AttackSetting, attack_setting, format_block

FAST = InversionSettings(steps=150, restarts=2)


def _data(task, owner: int = 64, outsiders: int = 8):
    n = task.num_train
    return (task.x_train[:owner], task.y_train[:owner], task.x_train[n - outsiders:], task.y_train[n - outsiders:])


def test_feature_inversion_recovers_training_images_without_projection_or_noise(digits_logreg, logreg_states):
    """features mode, identity projector, no noise: the server rebuilds the digits themselves."""
    setting = AttackSetting(mode="features", projector="identity", proj_dim=None, targets=6, inversion=FAST)
    block, images = attack_setting(digits_logreg, logreg_states, setting, *_data(digits_logreg),
                                   kinds=("inversion",))
    inv = block["inversion"]
    assert block["proj_dim"] == 650 and block["accounted_epsilon"] is None
    assert inv["labels_correct"] == 1.0
    assert inv["psnr_mean"] > 35 and inv["recovered"] == 1.0 and inv["ssim_mean"] > 0.98
    assert inv["psnr_mean"] > inv["baseline"]["psnr_mean"] + 15  # far above knowing the label
    assert inv["baseline"]["recovered"] == 0.0
    assert images["inversion_rec"].shape == (6, 64)


def test_a_small_clients_gram_gives_its_examples_away_without_noise(digits_logreg, logreg_states):
    setting = AttackSetting(mode="private", proj_dim=256, owner_sizes=(1, 4), inversion=FAST)
    block, images = attack_setting(digits_logreg, logreg_states, setting, *_data(digits_logreg),
                                   kinds=("small-owner",))
    rows = block["small_owner"]["sizes"]
    assert block["small_owner"]["release"] == "client Gram"
    assert [r["client_examples"] for r in rows] == [1, 4]
    assert all(r["recovered"] == 1.0 and r["psnr_mean"] > 30 for r in rows)
    assert images["small_owner_true"].shape == images["small_owner_rec"].shape == (4, 64)
    assert attack_conclusion(block).startswith(
        "Without noise a curious server reading an owner's releases (its client Gram) rebuilt all of the examples "
        f"of owners holding 1 or 4 (PSNR {rows[0]['psnr_mean']:.0f} dB for an owner holding 1 example, where a guess")


def test_membership_is_certain_without_noise(digits_logreg, logreg_states):
    setting = AttackSetting(mode="private", proj_dim=64, targets=8, trials=100)
    mem = attack_setting(digits_logreg, logreg_states, setting, *_data(digits_logreg),
                         kinds=("membership",))[0]["membership"]
    assert mem["tpr"] == 1.0 and mem["fpr"] == 0.0 and mem["empirical_epsilon_lower_bound"] > 2.5


def test_at_epsilon_1_no_attack_beats_its_baseline(digits_logreg, logreg_states):
    """DP at epsilon 1 (calibrated on each mode's release plan): reconstructions are no better
    than the class mean within the measured spread, and the membership attack's empirical
    epsilon stays below the accounted one."""
    feat = AttackSetting(mode="features", proj_dim=64, dp=attack_dp(digits_logreg, "features", 1.0), targets=6,
                         inversion=FAST)
    block = attack_setting(digits_logreg, logreg_states, feat, *_data(digits_logreg), kinds=("inversion",))[0]
    assert math.isclose(block["accounted_epsilon"], 1.0, abs_tol=0.01)
    inv = block["inversion"]
    assert inv["psnr_mean"] <= inv["baseline"]["psnr_mean"] + inv["baseline"]["psnr_std"]
    assert inv["recovered"] <= inv["baseline"]["recovered"]

    dp = attack_dp(digits_logreg, "private", 1.0, checkpoints=2)
    private = AttackSetting(mode="private", proj_dim=64, dp=dp, checkpoints=2, owner_sizes=(1, 4), targets=8,
                            trials=600, inversion=FAST)
    block = attack_setting(digits_logreg, logreg_states, private, *_data(digits_logreg),
                           kinds=("small-owner", "membership"))[0]
    assert math.isclose(block["accounted_epsilon"], 1.0, abs_tol=0.01)
    for row in block["small_owner"]["sizes"]:
        assert row["psnr_mean"] <= row["baseline"]["psnr_mean"] + row["baseline"]["psnr_std"]
        assert row["recovered"] <= row["baseline"]["recovered"]
    mem = block["membership"]
    assert mem["checkpoints"] == 2 and mem["trials"] == 600
    assert mem["empirical_epsilon_lower_bound"] < mem["accounted_epsilon"]


def test_secure_aggregation_leaves_a_one_example_owner_its_summary(digits_logreg, logreg_states):
    """Secure aggregation hides the Gram, not the owner summary: without noise, a client with
    one example still gives it away (its summary is its feature times a weight)."""
    setting = AttackSetting(mode="private", proj_dim=256, secure_agg=True, owner_sizes=(1,), inversion=FAST)
    block = attack_setting(digits_logreg, logreg_states, setting, *_data(digits_logreg), kinds=("small-owner",))[0]
    (row,) = block["small_owner"]["sizes"]
    assert block["small_owner"]["release"] == "owner summary" and row["recovered"] == 1.0


def test_metrics_and_bad_input():
    img = np.linspace(0, 1, 64).reshape(8, 8)
    assert metrics.psnr(img, img) == metrics.MAX_PSNR and metrics.ssim(img, img) == pytest.approx(1.0)
    assert metrics.psnr(img, np.clip(img + 0.1, 0, 1)) < 21
    assert metrics.image_shape((64,)) == (8, 8) and metrics.image_shape((1, 28, 28)) == (28, 28)
    with pytest.raises(FedtrakError, match="not single-channel images"):
        metrics.image_shape((3, 32, 32))


def test_unknown_attack_kind_is_refused(digits_logreg, logreg_states):
    with pytest.raises(FedtrakError, match="unknown attack kind"):
        attack_setting(digits_logreg, logreg_states, AttackSetting(), *_data(digits_logreg), kinds=("guess",))


@pytest.mark.parametrize("projector, k", [("identity", None), ("rademacher", 128), ("factorized", 128)])
def test_the_servers_feature_map_is_the_clients(digits_logreg, logreg_states, projector, k):
    """The attacker's differentiable features equal what a client computes and releases."""
    import torch

    from fedtrak.config.settings import Settings
    from fedtrak.simulations.attacks.view import ServerView
    from fedtrak.trak.projectors import Projection

    view = ServerView(digits_logreg, logreg_states[0], 0, Settings().replaced(projector=projector),
                      DPSettings(), Projection(projector, k or digits_logreg.num_params), "private")
    x, y = digits_logreg.x_train[:5], digits_logreg.y_train[:5]
    released, _, _ = view.client_features(x, y)
    mine = view.features(torch.as_tensor(x), torch.as_tensor(y)).detach().numpy()
    np.testing.assert_allclose(mine, released, rtol=1e-4, atol=1e-5 * np.abs(released).max())


def _owner_row(n: int, recovered: float, psnr: float) -> dict:
    return {"client_examples": n, "recovered": recovered, "psnr_mean": psnr, "baseline": {"psnr_mean": 14.77}}


def test_the_attack_conclusion_says_what_was_rebuilt_and_names_the_attacks_not_run():
    """One sentence of what the server rebuilt at the run's epsilon (only what was measured), the
    owner-size rows named by the examples the owner holds, then each attack not run, with why."""
    block = {"mode": "private", "projector": "rademacher", "proj_dim": 64, "secure_aggregation": False,
             "accounted_epsilon": None, "run_epsilon": None, "client_size": 150,
             "inversion": {"skipped": "private mode releases no per-example features"},
             "small_owner": {"release": "client Gram", "sizes": [
                 _owner_row(1, 1.0, 56.51), _owner_row(2, 1.0, 50), _owner_row(4, 0.75, 30), _owner_row(16, 0.0, 12),
                 _owner_row(64, 0.0, 11)]},
             "membership": {"tpr": 1.0, "fpr": 0.0, "empirical_epsilon_lower_bound": 4.045, "accounted_epsilon": None}}
    assert attack_conclusion(block).splitlines() == [
        ("Without noise a curious server reading an owner's releases (its client Gram) rebuilt all of the examples of "
        "owners holding 1 or 2, 3 of the 4 examples of an owner holding 4 and none of the examples of owners holding "
        "16 or 64 (PSNR 57 dB for an owner holding 1 example, where a guess of each class's mean image scores 15 dB); "
        "membership inference, telling the owner's examples from others, reached a true-positive rate of 1 at a "
        "false-positive rate of 0 (empirical epsilon >= 4.045). An example counts as rebuilt where it is "
        "recognizable (PSNR >= 20 dB)."),
        "Feature inversion was not run: private mode releases no per-example features."]
    text = format_block(block)
    assert "client 0 cut down to its first N examples (it holds 150), its client Gram attacked:" in text
    assert "    an owner holding 1 example: PSNR 56.51 dB, recovered 100%" in text and "small owner" not in text
    noised = {**block, "run_epsilon": 1.0, "small_owner": {"release": "owner summary", "sizes": [_owner_row(1, 0.0, 12)]},
              "membership": {"skipped": "features mode hides feature values, not their presence"},
              "gram": {"skipped": "public kernel: clients release no Gram, there is none to attack"}}
    assert format_block({**noised, "accounted_epsilon": 0.61}).startswith(
        "private mode, rademacher k = 64, epsilon 0.61 (the attacked client's releases; the whole run's 1)")
    assert attack_conclusion(noised).splitlines() == [
        ("At epsilon 1 a curious server reading an owner's releases (its owner summary) rebuilt none of the examples "
        "of an owner holding 1 example (PSNR 12 dB for an owner holding 1 example, where a guess of each class's "
        "mean image scores 15 dB). An example counts as rebuilt where it is recognizable (PSNR >= 20 dB)."),
        "Feature inversion was not run: private mode releases no per-example features.",
        "Membership inference was not run: features mode hides feature values, not their presence.",
        "The attack on a client's Gram was not run: public kernel: clients release no Gram, there is none to attack."]
