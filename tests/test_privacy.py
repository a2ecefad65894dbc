"""Differential privacy: the accountant against known values, the mechanisms' noise and
clipping, bad settings refused before any computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtrak.config.settings import Settings
from fedtrak.data.tasks import load_task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release, epsilon, prv_epsilon, sigma_for_epsilon
from fedtrak.privacy.budget import Scales
from fedtrak.privacy.mechanisms import (
    DPSettings,
    clip_scales,
    noise_floor,
    noised_gram,
    noised_owner_summaries,
    owner_summaries,
    release_plan,
)
from fedtrak.privacy.plan import resolve_dp
from fedtrak.simulations.cli import main

DELTA = 1e-5


@pytest.mark.parametrize("sigma, count, want", [(1.0, 1, 4.38), (4.0, 1, 0.93), (4.0, 10, 3.34)])
def test_accountant_known_values(sigma, count, want):
    releases = [Release("Gram", sigma, count)]
    assert epsilon(releases, DELTA) == pytest.approx(want, abs=0.02)
    assert prv_epsilon(releases, DELTA) == pytest.approx(want, abs=0.03)  # independent numerics


def test_accountant_inverse_and_edges():
    assert sigma_for_epsilon(1.0, 1, DELTA) == pytest.approx(3.73, abs=0.02)
    for target, releases in [(0.5, 5), (2.0, 3), (8.0, 8)]:
        sigma = sigma_for_epsilon(target, releases, DELTA)
        assert epsilon([Release("x", sigma, releases)], DELTA) == pytest.approx(target, rel=1e-6)
    # mixed releases compose as mu = sqrt(sum 1/sigma^2)
    mixed = [Release("a", 2.0, 1), Release("b", 4.0, 4)]
    assert epsilon(mixed, DELTA) == pytest.approx(epsilon([Release("c", 2.0 / math.sqrt(2), 1)], DELTA))
    assert epsilon([Release("x", 0.0)], DELTA) == math.inf
    assert sigma_for_epsilon(math.inf, 3, DELTA) == 0.0
    with pytest.raises(FedtrakError, match="epsilon must be positive"):
        sigma_for_epsilon(0.0, 1, DELTA)
    with pytest.raises(FedtrakError, match="delta must lie in"):
        epsilon([Release("x", 1.0)], 1.0)


def test_gram_noise_is_symmetric_with_the_stated_scale():
    dp = DPSettings(noise_multiplier=0.5, clip_norm=2.0)
    noise = noised_gram(np.zeros((300, 300)), dp, np.random.default_rng(0))
    np.testing.assert_array_equal(noise, noise.T)
    upper = noise[np.triu_indices(300)]
    assert upper.std() == pytest.approx(0.5 * 2.0**2, rel=0.02)
    assert abs(upper.mean()) < 0.02
    # its spectral norm is about 2 sigma C^2 sqrt(k): under the lambda floor for one client
    assert np.linalg.norm(noise, 2) < noise_floor(dp, 300, 1)
    assert np.linalg.norm(noise, 2) == pytest.approx(2 * 0.5 * 4 * math.sqrt(300), rel=0.1)


def test_the_curvature_weighted_gram_has_a_quarter_of_the_sensitivity(digits_logreg):
    """w = p (1 - p) <= 1/4: one clipped example moves the weighted Gram by at most C^2 / 4, so the
    noise (Gaussian and Skellam) and the lambda floor are a quarter of the plain kernel's, for the
    same epsilon; features mode also releases the weights (noised at sensitivity 1/4)."""
    from fedtrak.config.settings import Settings
    from fedtrak.privacy.distributed import DistributedNoise

    weighted = resolve_dp(Settings.from_flat({"epsilon": 2.0, "checkpoints": 3}), digits_logreg, 512)
    plain = resolve_dp(Settings.from_flat({"epsilon": 2.0, "checkpoints": 3, "weighting": "none"}),
                       digits_logreg, 512)
    assert weighted.gram_weight == 0.25 and plain.gram_weight == 1.0
    assert weighted.noise_multiplier == plain.noise_multiplier  # the same mechanisms, the same sigma
    assert weighted.gram_sensitivity == pytest.approx(plain.clip_norm**2 / 4)
    noise = noised_gram(np.zeros((300, 300)), weighted, np.random.default_rng(0))[np.triu_indices(300)]
    assert noise.std() == pytest.approx(weighted.sigma("gram") * weighted.clip_norm**2 / 4, rel=0.02)
    assert noise_floor(weighted, 512, 3) == pytest.approx(noise_floor(plain, 512, 3) / 4)
    rounding = np.sqrt(64 * 65 / 2)  # one unit per coordinate of a k = 64 upper triangle
    l2_weighted = DistributedNoise(64, 3, 2, 0).sensitivities(weighted)[0]
    l2_plain = DistributedNoise(64, 3, 2, 0).sensitivities(plain)[0]
    assert l2_weighted - rounding == pytest.approx((l2_plain - rounding) / 4)
    # a weighted model output's weights lie in [0, 1/4]
    logits = torch.randn(100, 10)
    w = digits_logreg.output.curvature(logits, torch.randint(0, 10, (100,)))
    assert float(w.min()) >= 0 and float(w.max()) <= 0.25
    features_plan = {r.what: r.describe()["sensitivity"] for r in release_plan("features", 3, weighted, False,
                                                                                weighted=True)}
    assert features_plan["curvature weights"] == "0.25 per checkpoint"
    private_plan = {r.what: r.describe()["sensitivity"] for r in release_plan("private", 3, weighted, False)}
    assert private_plan["Gram"] == "C^2 x 0.25 per checkpoint"


def test_a_target_epsilon_is_split_between_the_kinds_of_release(digits_logreg):
    """Each kind of release gets a share of mu^2 by its weight (1 each by default, 3 for the suspect
    count); its mechanisms split it. The base multiplier is the sigma one release alone would need."""
    from fedtrak.privacy.plan import run_release_plan

    s = Settings().replaced(epsilon=1.0, checkpoints=10, self_influence=True, kernel_source="public",
                            dp_train="off")  # no training share: the attribution gets the whole epsilon
    dp = resolve_dp(s, digits_logreg, 512, "public")
    assert epsilon(run_release_plan(s, dp, 512, source="public"), dp.delta) == pytest.approx(1.0, rel=1e-6)
    assert epsilon([Release("alone", dp.noise_multiplier)], dp.delta) == pytest.approx(1.0, rel=1e-6)
    total = 5  # count 1, summary (10 mechanisms) 1, suspects 3
    assert dp.sigma("suspects") == pytest.approx(dp.noise_multiplier * math.sqrt(total / 3))
    assert dp.sigma("summary") == pytest.approx(dp.noise_multiplier * math.sqrt(10 * total))
    assert dp.sigma("count") == pytest.approx(dp.noise_multiplier * math.sqrt(total))
    screening = resolve_dp(s.replaced(budget="suspects=8"), digits_logreg, 512, "public")
    assert screening.noise_multiplier == pytest.approx(dp.noise_multiplier)
    assert screening.sigma("suspects") == pytest.approx(dp.noise_multiplier * math.sqrt(10 / 8))
    with pytest.raises(FedtrakError, match="'bogus=1' is not KIND=NUMBER"):
        resolve_dp(s.replaced(budget="bogus=1"), digits_logreg, 512, "public")
    with pytest.raises(FedtrakError, match="budget splits a target epsilon"):
        Settings().replaced(noise_multiplier=1.0, budget="suspects=2")
    with pytest.raises(FedtrakError, match="releases summary, whose weight is 0"):
        resolve_dp(s.replaced(budget="summary=0"), digits_logreg, 512, "public")


def test_clipping_bounds_every_norm():
    rng = np.random.default_rng(1)
    norms = rng.uniform(0.1, 10, size=(3, 50))
    per = clip_scales(norms, 2.0, "per-checkpoint") * norms
    assert per.max() <= 2.0 + 1e-12 and np.allclose(per[norms < 2], norms[norms < 2])
    joint = clip_scales(norms, 2.0, "joint") * norms
    assert np.sqrt((joint**2).sum(axis=0)).max() <= 2.0 + 1e-12
    assert np.all(np.ptp(clip_scales(norms, 2.0, "joint"), axis=0) == 0)  # one factor per example


def test_owner_summaries_are_unbiased_and_the_plan_counts_releases():
    rng = np.random.default_rng(2)
    feats = [rng.standard_normal((40, 8)) for _ in range(2)]
    q = rng.uniform(0, 1, 40)
    dp = DPSettings(noise_multiplier=1.0, clip_norm=3.0)
    draws = np.stack([noised_owner_summaries(owner_summaries(feats, q), dp, rng) for _ in range(4000)])
    want = np.stack([q @ f for f in feats])
    np.testing.assert_allclose(draws.mean(axis=0), want, atol=0.15)
    assert draws.std(axis=0).mean() == pytest.approx(3.0, rel=0.03)
    counts = {r.what: r.count for r in release_plan("private", 3, dp, self_influence=True)}
    assert counts == {"Gram": 3, "example count": 1, "owner summary": 3, "suspect count": 1}
    joint = {r.what: r.count for r in release_plan("private", 3, DPSettings(1.0, 3.0, "joint"), False)}
    assert joint == {"Gram": 1, "example count": 1, "owner summary": 1}
    assert sum(r.count for r in release_plan("features", 3, dp, False)) == 6
    # features mode sends the exact count: replace-one adjacency, so a row moves by up to 2C; at sigma 4
    # and M = 10 that is epsilon 8.60, not the 4.98 an add/remove sensitivity of C would claim
    assert epsilon(release_plan("features", 10, DPSettings(4.0, 1.0), False), DELTA) == pytest.approx(8.596, abs=1e-3)
    plain = [Release("features", 4.0, 10), Release("out-to-loss weights", 4.0, 10)]
    assert epsilon(plain, DELTA) == pytest.approx(4.98, abs=0.01)


def test_clip_quantile_from_noised_histograms():
    from fedtrak.privacy.quantile import (
        NORM_EDGES,
        noised_histogram,
        norm_histogram,
        quantile_from_histogram,
    )

    rng = np.random.default_rng(4)
    norms = rng.lognormal(np.log(5.0), 0.3, size=(10, 300))  # ten clients
    exact = quantile_from_histogram(sum(norm_histogram(n) for n in norms), 0.5)
    assert exact == pytest.approx(np.median(norms), rel=0.13)  # one bin is 12% wide
    noised = quantile_from_histogram(sum(noised_histogram(norm_histogram(n), 2.0, rng) for n in norms), 0.5)
    assert noised == pytest.approx(exact, rel=0.3)
    assert norm_histogram(np.array([1e-9, 1e9])).tolist()[::len(NORM_EDGES) - 2] == [1.0, 1.0]
    with pytest.raises(FedtrakError, match="holds no mass"):
        quantile_from_histogram(-np.ones(len(NORM_EDGES) - 1), 0.5)
    with pytest.raises(FedtrakError, match="clip quantile must lie"):
        quantile_from_histogram(np.ones(len(NORM_EDGES) - 1), 1.0)
    with pytest.raises(FedtrakError, match="either clip-norm or clip-quantile"):
        Settings.from_flat({"clip-norm": 2.0, "clip-quantile": 0.5})


def test_epsilon_resolves_to_the_noise_of_the_whole_plan():
    task = load_task("digits-logreg")
    dp = resolve_dp(Settings.from_flat({"epsilon": 2.0, "checkpoints": 3, "secure-agg": False}), task, 512)
    assert dp.clip_norm == task.clip_norm and dp.noise_multiplier > 0
    plan = release_plan("private", 3, dp, self_influence=False)
    assert sum(r.count for r in plan) == 7
    # the run trains its checkpoints by DP-SGD: the attribution is sized for 1 - train-share of epsilon
    assert epsilon(plan, DELTA) == pytest.approx(2.0 * (1 - 0.75), rel=1e-6)
    given = resolve_dp(Settings.from_flat({"epsilon": 2.0, "checkpoints": 3, "secure-agg": False,
                                           "checkpoint-dir": "ckpts"}), task, 512)  # nothing trained
    assert epsilon(release_plan("private", 3, given, self_influence=False), DELTA) == pytest.approx(2.0, rel=1e-6)
    assert not resolve_dp(Settings(), task, 512).active


@pytest.mark.parametrize("flags, message", [
    (["--epsilon", "0"], "epsilon must be a number > 0, got 0.0"),
    (["--epsilon", "-1"], "epsilon must be a number > 0, got -1.0"),
    (["--delta", "1"], "delta must be a number > 0 and < 1, got 1.0"),
    (["--delta", "0"], "delta must be a number > 0 and < 1, got 0.0"),
    (["--clip-norm", "0"], "clip-norm must be a number > 0, got 0.0"),
    (["--clip-mode", "none"], "invalid choice"),
])
def test_bad_privacy_flags_exit_2(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_privacy_settings_fail_before_any_computation(tmp_path, capsys):
    out = tmp_path / "x"
    # a fixed lambda under the noise floor would leave the noised kernel indefinite
    assert main(["simulate", "--epsilon", "1", "--kernel-source", "private", "--lambda", "10", "--out", str(out), "--quiet"]) == 2
    assert "below the DP noise floor" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()  # nothing was trained
    assert main(["simulate", "--epsilon", "1", "--noise-multiplier", "2", "--out", str(out), "--quiet"]) == 2
    assert "either epsilon" in capsys.readouterr().err
    with pytest.raises(FedtrakError, match="clip-norm must be a number > 0, got -1.0"):
        Settings.from_flat({"clip-norm": -1.0})
    with pytest.raises(FedtrakError, match="delta must be a number > 0 and < 1, got 1.5"):
        Settings.from_flat({"delta": 1.5})


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_audit_never_exceeds_the_accountant(sigma):
    from fedtrak.simulations.evaluation.audit import audit_gram

    res = audit_gram("digits-logreg", noise_multiplier=sigma, releases=8)
    assert res["canaries"] == 8 * 512 and 0 < res["inserted"] < res["canaries"]
    assert res["empirical_epsilon_lower_bound"] <= res["accounted_epsilon_one_release"]
    if sigma == 0.5:  # little noise: the canaries are clearly visible (measured 3.1-3.5 of 10.0)
        assert res["empirical_epsilon_lower_bound"] > 2.0


def test_audit_catches_a_mechanism_noisier_on_paper_than_in_fact():
    from fedtrak.simulations.evaluation.audit import epsilon_lower_bound

    rng = np.random.default_rng(3)
    inserted = rng.random(20000) < 0.5
    claimed_sigma = 4.0  # accounted epsilon about 0.93, but the noise added is 10x smaller
    scores = inserted + rng.normal(0, claimed_sigma / 10, size=inserted.shape)
    lb, _ = epsilon_lower_bound(scores, inserted, DELTA)
    assert lb > epsilon([Release("Gram", claimed_sigma)], DELTA) + 1


def test_dp_sgd_trains_and_is_accounted_like_opacus():
    from opacus.accountants import RDPAccountant

    from fedtrak.data.checkpoints import accuracy, seeded_model
    from fedtrak.privacy.training import dp_sgd_epochs, local_steps, training_epsilon

    task = load_task("digits-logreg")
    model = seeded_model(task, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp_sgd_epochs(task, model, task.x_train, task.y_train, 3, noise_multiplier=0.5, max_grad_norm=1.0)
    assert set(model.state_dict()) == set(before)  # the plain model, not Opacus's wrapper
    assert accuracy(task, model, task.x_query, task.y_query) > 0.5  # it learns through the noise
    # The server knows the run seed and the global torch seed; neither fixes the noise or the batches.
    twin = seeded_model(task, 0)
    torch.manual_seed(0)
    dp_sgd_epochs(task, twin, task.x_train[:200], task.y_train[:200], 1, 0.5, 1.0)
    again = seeded_model(task, 0)
    torch.manual_seed(0)
    dp_sgd_epochs(task, again, task.x_train[:200], task.y_train[:200], 1, 0.5, 1.0)
    assert any(not torch.equal(a, b) for a, b in zip(twin.state_dict().values(), again.state_dict().values()))
    acc = RDPAccountant()
    acc.history = [(0.5, 64 / 1500, 3 * 24)]
    assert training_epsilon(0.5, 64, 1500, local_steps(1500, 64, 3), 1e-5) == pytest.approx(
        acc.get_epsilon(delta=1e-5))
    assert training_epsilon(0.0, 64, 1500, 10, 1e-5) == math.inf
    with pytest.raises(FedtrakError, match="positive noise multiplier"):
        dp_sgd_epochs(task, model, task.x_train, task.y_train, 1, 0.0, 1.0)


def test_the_canary_audit_of_the_owner_releases_stays_below_the_accountant():
    """The suspect count and the owner value, released by the client's own code with a worst-case
    canary: the empirical epsilon is positive (the audit has power) and below the accounted one."""
    from fedtrak.simulations.evaluation.audit import audit_owner_releases

    res = audit_owner_releases(1.0, trials=4000)
    assert res["owner_value"]["sensitivity_step"] == pytest.approx(res["value_bound"])  # clipped to exactly B
    for name in ("suspect_count", "owner_value"):
        assert 0.5 < res[name]["empirical_epsilon_lower_bound"] <= res["accounted_epsilon_one_release"]
    assert main(["audit", "--release", "owner", "--noise-multiplier", "2"]) == 0


def test_owner_totals_under_dp_use_the_wiener_ridge():
    """Noised owner summaries are turned into totals with K + (sigma_s C)^2 owners I: the same as
    preconditioning the queries with that kernel, from the queries preconditioned with K alone."""
    from fedtrak.privacy.mechanisms import summary_ridge
    from fedtrak.trak.kernel import with_more_ridge

    rng = np.random.default_rng(5)
    phi = rng.standard_normal((40, 6))
    kernel = phi.T @ phi + 0.5 * np.eye(6)
    queries = rng.standard_normal((3, 6))
    u = np.linalg.solve(kernel, queries.T).T
    np.testing.assert_allclose(with_more_ridge(u, kernel, 7.0), np.linalg.solve(kernel + 7 * np.eye(6), queries.T).T,
                               rtol=1e-10)
    np.testing.assert_allclose(with_more_ridge(u, kernel, 0.0), u, rtol=1e-10)
    dp = DPSettings(2.0, 5.0, scales=Scales.of({"summary": 3.0}))
    assert summary_ridge(dp, 10) == pytest.approx((6.0 * 5.0) ** 2 * 10)


def test_clipped_float32_features_never_exceed_the_clip_norm():
    """Rows scaled in float32, as the client does, stay within C (a float64 target of exactly C
    overshoots by up to 6e-8 relative after float32 rounding)."""
    from fedtrak.privacy.mechanisms import clip_scales

    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(20000, 64)) * rng.uniform(1, 100, size=(20000, 1))).astype(np.float32)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    for clip in (0.7, 3.0, 1000.0):
        clipped = rows * clip_scales(norms[None, :], clip, "per-checkpoint")[0][:, None].astype(np.float32)
        assert np.linalg.norm(clipped.astype(np.float64), axis=1).max() <= clip


def test_noise_comes_from_a_cryptographic_stream_on_a_grid():
    """SecureRandom's Gaussian and Poisson draws have their distributions; every noised value is a
    multiple of its power-of-two grid whatever the value was (no low-bit leak), and two sources
    never repeat each other."""
    from scipy import stats

    from fedtrak.privacy.sampling import SecureRandom, add_gaussian, grid_step

    rng = SecureRandom()
    z = rng.normal(0.0, 1.0, size=200_000)
    assert stats.kstest(z, "norm").pvalue > 1e-3 and abs(z.mean()) < 0.01
    for lam in (0.7, 5.0, 37.0, 2.0**20):
        draws = rng.poisson(lam, size=200_000)
        assert draws.dtype == np.int64 and draws.min() >= 0
        assert draws.mean() == pytest.approx(lam, rel=0.01 if lam > 1 else 0.03)
        assert draws.var() == pytest.approx(lam, rel=0.03)
    small = rng.poisson(5.0, size=100_000)
    observed = np.bincount(small, minlength=20)[:15]
    expected = stats.poisson.pmf(np.arange(15), 5.0) * len(small)
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    assert not np.array_equal(SecureRandom().normal(size=8), SecureRandom().normal(size=8))

    values = np.array([0.1, 0.1 + 2e-17, 1234.56789, -3.0])
    noised = add_gaussian(values, 2.0, rng)
    step = grid_step(2.0, values)
    assert step == 2.0**-23 and np.all(noised / step == np.rint(noised / step))
    spread = np.std([add_gaussian(np.zeros(1), 3.0, rng)[0] for _ in range(20_000)])
    assert spread == pytest.approx(3.0, rel=0.03)


def test_the_audit_chooses_its_threshold_on_other_trials_than_it_bounds():
    """With no signal at all, choosing the best of 99 thresholds on the trials it bounds finds a
    positive 'epsilon' by chance; chosen on one half and bounded on the other it finds none."""
    from fedtrak.simulations.evaluation.audit import epsilon_lower_bound

    rng = np.random.default_rng(5)
    found_in_sample = found_held_out = 0
    for _ in range(40):
        inserted = rng.random(60) < 0.5
        scores = rng.normal(size=60)  # the release says nothing about the canaries
        found_in_sample += epsilon_lower_bound(scores, inserted, DELTA)[0] > 0
        found_held_out += epsilon_lower_bound(scores, inserted, DELTA, held_out=True)[0] > 0
    assert found_held_out <= 1 < found_in_sample


def test_budget_scales_are_typed_and_text_only_at_the_boundary():
    """The per-kind scales are a hashable mapping (a DPSettings stays a cache key), read without
    parsing; their text (the job record's, the summary's) round-trips exactly."""
    from fedtrak.wire.job import Job, Resolved
    from fedtrak.wire.records import decode_job, encode_job

    scales = Scales.of({"gram": 4.5, "count": 1 / 3})
    dp = DPSettings(2.0, 1.0, scales=scales)
    assert hash(dp) == hash(DPSettings(2.0, 1.0, scales=Scales.parse(scales.text())))
    assert dp.sigma("count") == 2.0 / 3 and dp.sigma("summary") == 2.0
    resolved = Resolved(64, 2.0, 1.0, budget_scales=scales)
    assert resolved.describe()["budget_scales"] == "count=0.3333333333333333,gram=4.5"
    assert Resolved(**resolved.describe()) == resolved  # the run summary's form reads back
    job = Job("r", Settings(), resolved)
    assert decode_job(encode_job(job)).resolved.budget_scales == scales
    with pytest.raises(FedtrakError, match="budget scales must be positive"):
        DPSettings(1.0, 1.0, scales=Scales.of({"gram": 0.0})).validate()
