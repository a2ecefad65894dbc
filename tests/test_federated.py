"""The core invariant on Flower's simulation engine: with privacy off, ``fedtrak simulate``
gives the centralized scores and owner totals, in private mode (clients release Grams
and score locally) and in features mode, for 1, 3 and 10 clients, IID and Dirichlet.
Each simulation runs once per session and is shared by the tests that read it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from crafted import counted_preflights
from test_summary import FEDERATED_ONLY

from fedtrak.client.device import format_results, read_results
from fedtrak.config.settings import Settings
from fedtrak.data.partition import partition
from fedtrak.errors import FedtrakError
from fedtrak.results.summary import KEYS as SUMMARY_KEYS
from fedtrak.results.summary import load as load_summary
from fedtrak.simulations.attribute import central_scores, run_attribute
from fedtrak.simulations.cli import main
from fedtrak.simulations.faults import faulty_handlers
from fedtrak.simulations.simulate import run_simulation
from fedtrak.wire.compat import PROTOCOL_VERSION

pytestmark = pytest.mark.flower

K = 128
SETUPS = [(1, "iid"), (3, "iid"), (3, "dirichlet"), (10, "iid"), (10, "dirichlet")]
ROOT = Path(__file__).resolve().parents[1]


#: The plain kernel (traker's ``Phi^T Phi``) is checked on the 10 IID clients; every other setup
#: uses the default, curvature-weighted kernel.
PLAIN = (10, "iid")


def _weighting(clients: int, scheme: str) -> str:
    return "none" if (clients, scheme) == PLAIN else "curvature"


#: The dense projector throughout: its features determine a logistic regression's input, so the
#: attacks below show what a server rebuilds without noise (the factorized one, auto's choice for
#: this model, projects each layer's input to fewer dimensions: tests/test_cli.py runs it).
PROJECTOR = "rademacher"


def _settings(out: Path, ckpts: Path, clients: int, scheme: str, **extra) -> dict:
    return {"clients": clients, "partition": scheme, "alpha": 0.5, "partition-seed": 1, "projector": PROJECTOR,
            "checkpoint-dir": str(ckpts), "proj-dim": K, "out": str(out),
            "weighting": _weighting(clients, scheme), **extra}


@pytest.fixture(scope="session")
def sim_factory(tmp_path_factory, logreg_ckpt_dir):
    """Runs (and caches) a simulation per (clients, scheme, mode, policy, extra settings); ``preflights``
    counts each run's preflights, by run folder."""
    cache: dict = {}

    def get(clients: int, scheme: str, mode: str, policy: str = "full", **extra) -> Path:
        key = (clients, scheme, mode, policy, tuple(sorted(extra.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"sim-{clients}-{scheme}-{mode}-{policy}")
            cfg = Settings.from_flat(_settings(out, logreg_ckpt_dir, clients, scheme, mode=mode,
                                              policy=policy, **{"allow-full": policy == "full"}, **extra))
            with counted_preflights() as calls:
                run_simulation(cfg)
            cache[key], get.preflights[out] = out, len(calls)
        return cache[key]

    get.preflights = {}
    return get


@pytest.fixture(scope="session")
def central_factory(tmp_path_factory, logreg_ckpt_dir):
    """The centralized reference run per (clients, scheme)."""
    cache: dict = {}

    def get(clients: int, scheme: str) -> Path:
        if (clients, scheme) not in cache:
            out = tmp_path_factory.mktemp(f"central-{clients}-{scheme}")
            run_attribute(Settings().replaced(out=str(out), clients=clients, partition=scheme, alpha=0.5,
                                              partition_seed=1, checkpoint_dir=str(logreg_ckpt_dir), proj_dim=K,
                                              projector=PROJECTOR,
                                              weighting=_weighting(clients, scheme)), progress=False)
            cache[(clients, scheme)] = out
        return cache[(clients, scheme)]

    return get


def test_a_federated_and_the_central_summary_share_their_keys(sim_factory, central_factory):
    """One builder for both runs: the central summary's keys are the federated one's less the
    federation's own, each a key the summary module lists, and the blocks both write agree."""
    runs = (sim_factory(3, "iid", "private"), central_factory(3, "iid"))
    fed, central = (load_summary(run).doc for run in runs)
    assert set(central) <= set(fed) and set(fed) - set(central) == FEDERATED_ONLY
    assert set(fed) <= SUMMARY_KEYS and set(fed["privacy"]) <= SUMMARY_KEYS
    for key in ("resolved", "settings", "config"):
        assert set(central[key]) == set(fed[key]), key
    assert set(fed["partition"]) <= set(central["partition"])
    assert set(central["checkpoints"][0]) <= set(fed["checkpoints"][0])


def test_a_simulated_run_preflights_once(sim_factory):
    """The simulation resolves its settings before Ray starts and hands the plan to its ServerApp."""
    run = sim_factory(3, "iid", "private")
    assert sim_factory.preflights[run] == 1


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("mode", ["private", "features"])
@pytest.mark.parametrize("clients, scheme", SETUPS)
def test_simulate_equals_attribute(sim_factory, central_factory, clients, scheme, mode):
    sim, central = sim_factory(clients, scheme, mode), central_factory(clients, scheme)
    _assert_close(np.load(sim / "scores.npy"), np.load(central / "scores.npy"))
    _assert_close(np.load(sim / "owner_scores.npy"), np.load(central / "owner_scores.npy"))
    np.testing.assert_array_equal(np.load(sim / "example_ids.npy"), np.load(central / "example_ids.npy"))
    summary = json.loads((sim / "summary.json").read_text())
    assert summary["complete"] and summary["complete_federation"] and summary["excluded"] == []
    assert summary["lambda"] == pytest.approx(json.loads((central / "summary.json").read_text())["lambda"])
    assert len(summary["clients"]) == clients
    assert all(c["bytes_sent"] > 0 and c["bytes_received"] > 0 for c in summary["clients"])
    assert summary["seconds"]["total"] > 0


#: The topk run also sends its 149 queries in batches of 40 and releases owner values and screening.
BATCHED = {"query-batch": 40, "owner-value": "all", "self-influence": True}


def test_owner_totals_and_topk_policies_release_no_scores(sim_factory, central_factory):
    central = central_factory(3, "dirichlet")
    for policy in ("owner-totals", "topk"):
        sim = sim_factory(3, "dirichlet", "private", policy, **(BATCHED if policy == "topk" else {}))
        _assert_close(np.load(sim / "owner_scores.npy"), np.load(central / "owner_scores.npy"))
        assert not (sim / "scores.npy").exists() and not (sim / "example_ids.npy").exists()
        summary = json.loads((sim / "summary.json").read_text())
        full = json.loads((sim_factory(3, "dirichlet", "private") / "summary.json").read_text())
        # owner totals are one number per query: far fewer bytes back than full score matrices
        assert summary["bytes"]["per_step"]["query.score"]["received"] < \
            full["bytes"]["per_step"]["query.score"]["received"] / 10
        if policy == "owner-totals":  # 149 queries >= k = 128: the summary route, no queries sent
            assert summary["bytes"]["per_step"]["query.score"]["sent"] < \
                full["bytes"]["per_step"]["query.score"]["sent"] / 10
    # topk: each client kept its best examples per query on the device, for its owner, joining the
    # four query batches by offset; owner values and screening were released once
    scores = np.load(central / "scores.npy")
    ids = np.load(central / "example_ids.npy")
    for owner in range(3):
        kept = np.load(sim / "client-stores" / f"partition-{owner}" / summary["run_id"] / "results" / "topk.npz")
        mine = scores[:, ids["client"] == owner]
        assert kept["proponent_ids"].shape[0] == 149 and kept["suspect_ids"].shape == (10,)
        best = ids["index"][ids["client"] == owner][np.argmax(mine, axis=1)]
        np.testing.assert_array_equal(kept["proponent_ids"][:, 0], best)
        worst = ids["index"][ids["client"] == owner][np.argmin(mine, axis=1)]
        np.testing.assert_array_equal(kept["opponent_ids"][:, 0], worst)
    _assert_close(np.load(sim / "owner_value.npy")[0], np.load(central / "owner_scores.npy").sum(axis=0))
    step, one = summary["bytes"]["per_step"]["query.score"], full["bytes"]["per_step"]["query.score"]
    m = summary["num_checkpoints"]
    all_of_u, inverses = 149 * K * 4 * m, m * K * (K + 1) // 2 * 8  # float32 U; the first batch's inverses
    assert one["largest_sent"] > all_of_u and step["largest_sent"] - inverses < all_of_u * 0.3
    assert step["sent"] > 3 * all_of_u  # every client got every row, batch by batch
    # the owner's own view: `fedtrak device results` reads it, with the images of the examples
    store = sim / "client-stores" / "partition-0"
    text = format_results(read_results(store))
    assert f"query 0: proponents {kept_first(store, summary)}" in text
    assert (store / summary["run_id"] / "results" / "topk.png").is_file()


def kept_first(store: Path, summary: dict) -> str:
    kept = np.load(store / summary["run_id"] / "results" / "topk.npz")
    return f"{kept['proponent_ids'][0, 0]} ({kept['proponent_scores'][0, 0]:+.3g})"


def test_failing_and_malicious_clients_are_excluded(tmp_path, logreg_ckpt_dir, digits_logreg, logreg_states):
    faults = {1: "raise", 2: "gram-shape", 3: "gram-nan", 4: "gram-asym", 5: "gram-not-psd",
              6: "score-shape", 7: "score-nan", 9: "old-protocol", 10: "other-task"}
    settings = _settings(tmp_path, logreg_ckpt_dir, 11, "iid", policy="full", **{"allow-full": True})
    cfg = Settings.from_flat(settings)
    run_simulation(cfg, handlers=faulty_handlers(faults))
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {int(e["owner"]) if e["owner"] else None: e["reason"] for e in summary["excluded"]}
    assert summary["complete"] and not summary["complete_federation"] and "warning" in summary
    assert "crashed" in reasons[None]  # a client that raised before saying who it is
    assert "Gram upper triangle has shape" in reasons[2]
    assert "NaN" in reasons[3]
    assert "not symmetric" in reasons[4]
    assert "not positive semi-definite" in reasons[5]
    assert "owner totals have shape" in reasons[6]
    assert "NaN or infinity" in reasons[7]
    assert "client 9 (node" in reasons[9] and f"protocol version 1, this side {PROTOCOL_VERSION}" in reasons[9]
    assert "client 10 (node" in reasons[10] and "has task fingerprint 0000000000000000" in reasons[10]
    assert [o["owner"] for o in summary["owners"]] == ["0", "8"]
    # The kernel holds the Grams of clients 0, 6, 7, 8 (6 and 7 failed only when scoring);
    # the released scores are those of clients 0 and 8.
    parts = partition(digits_logreg.y_train, 11, "iid", 0.5, 1)
    kernel_idx = np.concatenate([parts.clients[c] for c in (0, 6, 7, 8)])
    ref, _, _ = central_scores(digits_logreg, logreg_states, digits_logreg.x_train[kernel_idx],
                            digits_logreg.y_train[kernel_idx], Settings().replaced(proj_dim=K, projector=PROJECTOR))
    n0, n_mid = len(parts.clients[0]), len(parts.clients[6]) + len(parts.clients[7])
    want = np.concatenate([ref[:, :n0], ref[:, n0 + n_mid:]], axis=1)
    _assert_close(np.load(tmp_path / "scores.npy"), want)


def test_oversized_releases_under_dp_are_excluded_by_name(tmp_path, logreg_ckpt_dir):
    """Under DP (features clipped), a Gram scaled by 1e6, a Gram of -1e12 I and owner summaries of
    1e12 break the bounds clipping and noise set: their senders are excluded by name, the honest
    clients' noised releases all pass."""
    faults = {1: "gram-scaled", 2: "gram-negative", 3: "summary-huge"}
    cfg = Settings.from_flat(_settings(tmp_path, logreg_ckpt_dir, 5, "iid", epsilon=4.0, **{
        "kernel-source": "private", "secure-agg": False}))
    run_simulation(cfg, handlers=faulty_handlers(faults))
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {int(e["owner"]): e["reason"] for e in summary["excluded"]}
    assert sorted(reasons) == [1, 2, 3]
    assert "client 1 (node" in reasons[1] and "Gram of checkpoint 0 has diagonal entries" in reasons[1]
    assert "client 2 (node" in reasons[2] and "Gram of checkpoint 0 has diagonal entries" in reasons[2]
    assert "client 3 (node" in reasons[3] and "an owner summary has norm 1.1" in reasons[3]
    assert [o["owner"] for o in summary["owners"]] == ["0", "4"]


def test_full_policy_is_refused_by_clients_unless_allowed(tmp_path, logreg_ckpt_dir):
    from fedtrak.errors import FedtrakError

    with pytest.raises(FedtrakError, match="allow-full"):
        Settings.from_flat({"policy": "full"})
    # A server that claims the policy anyway meets clients whose run config forbids it.
    cfg = Settings.from_flat(_settings(tmp_path, logreg_ckpt_dir, 2, "iid", policy="full",
                                      **{"allow-full": True}))
    with pytest.raises(FedtrakError, match="no client is left after score.*refused"):
        run_simulation(cfg, node_settings={"serve-full": False})
    assert not (tmp_path / "summary.json").exists()


def test_a_run_that_died_after_its_kernels_resumes_without_a_featurize_round(tmp_path, logreg_ckpt_dir,
                                                                            central_factory):
    """Every client crashes while scoring, so the run dies with its kernels saved; the same run
    config with resume=true reuses the job, the checkpoints and the kernels, scores, and says so."""
    settings = _settings(tmp_path, logreg_ckpt_dir, 3, "iid")
    cfg = Settings.from_flat(settings)
    with pytest.raises(FedtrakError, match="no client is left after score"):
        run_simulation(cfg, handlers=faulty_handlers({0: "score-raise", 1: "score-raise", 2: "score-raise"}))
    assert not (tmp_path / "summary.json").exists() and (tmp_path / ".resume" / "kernels.npz").is_file()
    with pytest.raises(FedtrakError, match=r"other settings for \['proj-dim'\]"):
        run_simulation(Settings.from_flat({**settings, "resume": True, "proj-dim": 64}))
    summary = run_simulation(Settings.from_flat({**settings, "resume": True}))
    assert "featurize_round" not in summary.seconds and "score_round" in summary.seconds
    assert summary.resumed.reused[-1] == "the summed kernels of 3 owners (no featurize round)"
    assert not (tmp_path / ".resume").exists()
    _assert_close(np.load(tmp_path / "owner_scores.npy"), np.load(central_factory(3, "iid") / "owner_scores.npy"))


@pytest.mark.parametrize("policy", ["full", "topk"])
def test_flipped_labels_and_self_influence_equal_central(tmp_path, logreg_ckpt_dir, policy):
    """A mislabel experiment: clients flip their own labels; the server sends K_m^-1 so each
    client computes its examples' self-influence and releases its owner mean (all of it under
    ``full``; under ``topk`` its most suspicious examples stay on the device)."""
    central = tmp_path / "central"
    run_attribute(Settings().replaced(out=str(central), clients=3, partition="iid", partition_seed=1,
                                      checkpoint_dir=str(logreg_ckpt_dir), flip_fraction=0.2, flip_clients=(1,),
                                      proj_dim=K, projector=PROJECTOR), progress=False)
    sim = tmp_path / "sim"
    run_simulation(Settings.from_flat(_settings(sim, logreg_ckpt_dir, 3, "iid", policy=policy,
                                               **{"allow-full": policy == "full", "flip-fraction": 0.2,
                                                  "flip-clients": "1"})))
    for name in ("owner_scores", "owner_self_influence"):
        _assert_close(np.load(sim / f"{name}.npy"), np.load(central / f"{name}.npy"))
    np.testing.assert_array_equal(np.load(sim / "flipped.npy"), np.load(central / "flipped.npy"))
    summary = json.loads((sim / "summary.json").read_text())
    assert summary["flips"] == json.loads((central / "summary.json").read_text())["flips"]
    assert summary["partition"] == {"scheme": "iid", "alpha": None, "seed": 1, "num_clients": 3}
    own = np.load(sim / "owner_self_influence.npy")
    assert own[1] > 1.5 * max(own[0], own[2])  # the flipped owner stands out
    if policy == "full":
        _assert_close(np.load(sim / "scores.npy"), np.load(central / "scores.npy"))
        _assert_close(np.load(sim / "self_influence.npy"), np.load(central / "self_influence.npy"))
    else:
        assert not (sim / "self_influence.npy").exists()
        kept = np.load(sim / "client-stores" / "partition-1" / summary["run_id"] / "results" / "topk.npz")
        si = np.load(central / "self_influence.npy")
        ids = np.load(central / "example_ids.npy")
        mine = ids["client"] == 1
        assert kept["suspect_ids"][0] == ids["index"][mine][np.argmax(si[mine])]


def test_noise_off_equals_the_non_private_run_bit_for_bit(sim_factory, tmp_path, logreg_ckpt_dir):
    """DP settings with no noise (noise multiplier 0, epsilon unset, a clip norm given) change nothing."""
    plain = sim_factory(3, "iid", "private")
    out = tmp_path / "noise-off"
    run_simulation(Settings.from_flat(_settings(out, logreg_ckpt_dir, 3, "iid", policy="full", **{
        "allow-full": True, "noise-multiplier": 0.0, "epsilon": "", "clip-norm": 1.0})))
    names = sorted(p.name for p in plain.glob("*.npy"))
    assert names == sorted(p.name for p in out.glob("*.npy")) and "scores.npy" in names
    for name in names:
        a, b = np.load(plain / name), np.load(out / name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["dp"] is False


def test_private_mode_with_dp_noise(tmp_path, logreg_ckpt_dir, central_factory):
    """A run at epsilon 8 with C chosen under DP: the accounted epsilon is the target, lambda sits
    at the noise floor, the releases are noised (the owner totals differ from the exact ones)."""
    out = tmp_path / "dp"
    run_simulation(Settings.from_flat(_settings(out, logreg_ckpt_dir, 3, "iid", policy="owner-totals",
                                               epsilon=8.0, **{"self-influence": True, "clip-quantile": 0.5,
                                                               "kernel-source": "private",
                                                               "secure-agg": False})))
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["dp"] and privacy["epsilon"] == pytest.approx(8.0, rel=1e-6)
    assert privacy["epsilon_prv"] == pytest.approx(8.0, abs=0.1)
    assert {r["what"]: r["count"] for r in privacy["ledger"]} == {
        "norm histogram (clip quantile)": 1, "Gram": 3, "example count": 1, "owner summary": 3,
        "suspect count": 1}
    # C from the clients' noised norm histograms: near the median feature norm (4.7 measured)
    assert 3.5 < privacy["clip_norm"] < 7 and privacy["clip_norm_rule"].startswith("DP quantile 0.5")
    assert privacy["not_covered"] == [] and "clip_round" in summary["seconds"]
    for rec in summary["checkpoints"]:
        assert rec["lambda"] == pytest.approx(rec["lambda_noise_floor"])
        assert rec["lambda_noise_floor"] > rec["lambda_rule_value"]
    exact = np.load(central_factory(3, "iid") / "owner_scores.npy")
    noised = np.load(out / "owner_scores.npy")
    assert noised.shape == exact.shape and not np.allclose(noised, exact)
    assert np.all(np.isfinite(noised))  # quality against epsilon: the sweep (docs/results.md) measures it
    assert np.load(out / "owner_self_influence.npy").shape == (3,)
    # every noised release is kept on the device, so a resent step repeats it instead of drawing fresh noise
    kept = [{p.name for p in d.iterdir()} for d in (out / "client-stores").glob("*/*/released")]
    assert len(kept) == 3 and all({"gram-0.npy", "gram-1.npy", "gram-2.npy", "histogram.npy", "summary-0.npy",
                                   "summary-1.npy", "summary-2.npy", "suspects.npy"} <= k for k in kept)

    # the curious server's attacks on this run's releases, with the run's own C and sigma
    assert main(["attack", str(out), "--targets", "4", "--trials", "300", "--steps", "100"]) == 0
    attacks = json.loads((out / "summary.json").read_text())["attacks"]
    assert attacks["noise_multiplier"] == privacy["noise_multiplier"] and attacks["run_epsilon"] == privacy["epsilon"]
    assert attacks["inversion"] == {"skipped": "private mode releases no per-example features"}
    assert [r["client_examples"] for r in attacks["small_owner"]["sizes"]] == [1, 2, 4, 16, 64]
    for row in attacks["small_owner"]["sizes"]:
        assert row["recovered"] <= row["baseline"]["recovered"] + 0.25
    mem = attacks["membership"]
    assert mem["empirical_epsilon_lower_bound"] < mem["accounted_epsilon"] <= privacy["epsilon"]
    assert (out / "attacks.npz").is_file()


def test_attack_cli_on_a_features_run_rebuilds_the_images(sim_factory, tmp_path, central_factory):
    """features mode sends every feature: at k = 128 (dense projector) without noise the server
    rebuilds client 0's digits. A centralized run released nothing and is refused."""
    run = tmp_path / "features-run"
    shutil.copytree(sim_factory(3, "iid", "features"), run)
    assert main(["attack", str(run), "--targets", "4", "--steps", "150", "--restarts", "2"]) == 0
    inv = json.loads((run / "summary.json").read_text())["attacks"]["inversion"]
    assert inv["recovered"] == 1.0 and inv["psnr_mean"] > inv["baseline"]["psnr_mean"] + 15
    assert main(["report", str(run)]) == 0  # the strips of true and rebuilt digits, and the table
    page = (run / "report.html").read_text()
    assert "<h2>Attacks</h2>" in page and "feature inversion" in page
    assert (run / "report" / "attacks.png").read_bytes().startswith(b"\x89PNG")
    assert main(["attack", str(central_factory(3, "iid"))]) == 2

