"""Kernel sources: the private Grams, the server's public data, and the hybrid of both.

The estimators against their references (Ledoit-Wolf against scikit-learn's), the choice of
source, the errors, and on Flower's simulation engine: every source equals the centralized run
without noise, and a public kernel under DP releases no Gram (the ledger and the attacks say so).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from fedtrak.config.settings import Settings
from fedtrak.errors import FedtrakError
from fedtrak.privacy.plan import uses_secure_agg
from fedtrak.simulations.attribute import run_attribute
from fedtrak.simulations.cli import main
from fedtrak.simulations.simulate import run_simulation
from fedtrak.trak.kernel_sources import (
    hybrid_gram,
    ledoit_wolf,
    psd_part,
    public_data,
    resolve_kernel_source,
)

K = 128


def test_ledoit_wolf_matches_scikit_learn():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 60)) * np.linspace(0.1, 3, 60)  # fewer examples than dimensions
    want = LedoitWolf(assume_centered=True).fit(rows).covariance_
    np.testing.assert_allclose(ledoit_wolf(rows), want, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(ledoit_wolf(rows)).min() > 0  # well conditioned although rank 40 < 60


def test_psd_part_and_hybrid_weight():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((20, 8))
    exact = a.T @ a
    noise = rng.standard_normal((8, 8)) * 3
    noised = exact + (noise + noise.T) / 2
    psd = psd_part(noised)
    assert np.linalg.eigvalsh(psd).min() > -1e-9 and np.allclose(psd, psd.T)
    np.testing.assert_allclose(psd_part(exact), exact, atol=1e-9)  # already PSD: unchanged
    public = exact * 0.9
    no_noise, weight = hybrid_gram(exact, public, 0.0)
    assert weight == 0 and np.allclose(no_noise, exact)
    drowned, weight = hybrid_gram(noised, public, 1e12)
    assert weight == 1 and np.allclose(drowned, public)
    _, weight = hybrid_gram(noised, public, 9.0 * 64 / 2)
    assert 0 < weight < 1


def test_kernel_source_choice_and_errors(digits_logreg, tmp_path):
    task = digits_logreg
    assert resolve_kernel_source(Settings(), task) == "private"  # no noise: the exact kernel
    assert resolve_kernel_source(Settings().replaced(epsilon=1.0), task) == "public"
    assert resolve_kernel_source(Settings().replaced(epsilon=1.0, secure_agg=True), task) == "hybrid"
    # secure aggregation is the default under DP wherever Grams are released and 3 clients or more take part
    dp = Settings().replaced(epsilon=1.0)
    assert uses_secure_agg(dp, "private") and uses_secure_agg(dp, "hybrid") and not uses_secure_agg(dp, "public")
    assert not uses_secure_agg(Settings(), "private") and not uses_secure_agg(dp.replaced(clients=2), "private")
    assert not uses_secure_agg(dp.replaced(secure_agg=False), "private")
    no_public = replace(task, x_public=None, y_public=None)
    assert resolve_kernel_source(Settings().replaced(epsilon=1.0), no_public) == "private"
    with pytest.raises(FedtrakError, match="kernel-source public needs public data"):
        resolve_kernel_source(Settings().replaced(kernel_source="public"), no_public)
    with pytest.raises(FedtrakError, match="secure-agg has nothing to sum"):
        resolve_kernel_source(Settings().replaced(kernel_source="public", secure_agg=True, clients=3), task)
    assert public_data(Settings().replaced(public_data="queries"), task)[0] is task.x_query
    good = tmp_path / "pub.npz"
    np.savez(good, x=task.x_query[:5], y=task.y_query[:5])
    x, y = public_data(Settings().replaced(public_data=str(good)), task)
    assert x.shape == (5, 64) and y.dtype == np.int64
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 3)), y=np.zeros(5, dtype=int))
    with pytest.raises(FedtrakError, match="do not fit task digits-logreg"):
        public_data(Settings().replaced(public_data=str(bad)), task)
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    with pytest.raises(FedtrakError, match="cannot read arrays x and y"):
        public_data(Settings().replaced(public_data=str(tmp_path / "corrupt.npz")), task)


def _run(out: Path, ckpts: Path, source: str, **extra) -> dict:
    return {"clients": 3, "partition": "iid", "checkpoint-dir": str(ckpts), "proj-dim": K, "out": str(out),
            "kernel-source": source, **extra}


@pytest.mark.flower
@pytest.mark.parametrize("source", ["public", "hybrid"])
def test_every_kernel_source_federated_equals_central(tmp_path, logreg_ckpt_dir, source):
    sim, central = tmp_path / "sim", tmp_path / "central"
    run_simulation(Settings.from_flat(_run(sim, logreg_ckpt_dir, source, policy="full", **{"allow-full": True},
                                           **{"owner-value": "label"})))
    run_attribute(Settings().replaced(out=str(central), clients=3, checkpoint_dir=str(logreg_ckpt_dir),
                                      proj_dim=K, kernel_source=source, owner_value="label"), progress=False)
    for name in ("scores", "owner_scores", "owner_value"):  # owner values: released by the owners
        a, b = np.load(sim / f"{name}.npy"), np.load(central / f"{name}.npy")
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    summary = json.loads((sim / "summary.json").read_text())
    assert summary["kernel_source"] == source
    assert all(r["kernel_source"] == source and r["num_public"] == 148 for r in summary["checkpoints"])
    if source == "hybrid":  # no noise: the private Gram alone
        assert all(r["prior_weight"] == 0 for r in summary["checkpoints"])


@pytest.mark.flower
def test_a_public_kernel_under_dp_releases_no_gram(tmp_path, logreg_ckpt_dir):
    out = tmp_path / "dp-public"
    run_simulation(Settings.from_flat(_run(out, logreg_ckpt_dir, "auto", epsilon=1.0,
                                           **{"owner-value": "all", "self-influence": True})))
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert summary["kernel_source"] == privacy["kernel_source"] == "public"  # auto under DP
    assert privacy["epsilon"] == pytest.approx(1.0, rel=1e-6)
    assert {r["what"]: r["count"] for r in privacy["ledger"]} == {"example count": 1, "owner summary": 3,
                                                                  "owner value": 1, "suspect count": 1}
    assert not privacy["secure_aggregation"]  # no Gram released: nothing to aggregate securely
    # one example's share of an owner value is bounded by the public examples' shares, and its
    # self-influence counts as a suspect above their (held-out) quantile
    # examples' shares, far below the worst case the clip norm gives
    assert 0 < privacy["owner_value_clip"] and 0 < privacy["suspect_threshold"]
    values = np.load(out / "owner_value.npy")
    derived = np.load(out / "owner_value_groups.npy") @ np.load(out / "owner_scores.npy")  # from noised summaries
    assert values.shape == derived.shape == (1, 3) and not np.allclose(values, derived)
    assert all("lambda_noise_floor" not in r for r in summary["checkpoints"])  # no noised kernel to floor
    kept = [{p.name for p in d.iterdir()} for d in (out / "client-stores").glob("*/*/released")]
    assert len(kept) == 3 and not any(name.startswith("gram") for k in kept for name in k)
    assert main(["attack", str(out), "--targets", "4", "--trials", "200", "--steps", "50",
                 "--kind", "small-owner", "--kind", "membership"]) == 0
    attacks = json.loads((out / "summary.json").read_text())["attacks"]
    assert attacks["gram"] == {"skipped": "public kernel: clients release no Gram, there is none to attack"}
    assert attacks["small_owner"]["release"] == "owner summary"
    mem = attacks["membership"]
    assert mem["empirical_epsilon_lower_bound"] <= mem["accounted_epsilon"] <= privacy["epsilon"] + 1e-6


def test_public_examples_self_influence_is_measured_held_out():
    """A public kernel's own examples have lower self terms than examples it never saw; the
    cross-fitted terms put the public examples back among the unseen ones (their means agree
    within 10%, where the in-sample terms are far lower)."""
    from fedtrak.trak.featurizer import Features
    from fedtrak.trak.kernel import Kernel, effective_inverse
    from fedtrak.trak.kernel_sources import held_out_self_terms, source_gram
    from fedtrak.trak.scoring import self_kernel_term

    rng = np.random.default_rng(7)
    spread = np.linspace(0.2, 3.0, 100)  # 60 public examples in 100 dimensions of unequal spread
    pub = Features(rng.standard_normal((60, 100)) * spread, np.ones(60), None)
    unseen = rng.standard_normal((2000, 100)) * spread
    matrix = source_gram("public", None, 400.0, pub, weighted=False)[0]
    kinv = effective_inverse(Kernel(matrix, 1.0))
    inside = self_kernel_term(pub.features, kinv).mean()
    fresh = self_kernel_term(unseen, kinv).mean()
    held = held_out_self_terms("public", pub, None, 400.0, False, 0.0, 1.0, "none", kinv).mean()
    assert inside < 0.75 * fresh and abs(held / fresh - 1) < 0.1  # measured: 0.155, 0.247, 0.247
    np.testing.assert_allclose(held_out_self_terms("private", pub, matrix, 400.0, False, 0.0, 1.0, "none", kinv),
                               self_kernel_term(pub.features, kinv))
