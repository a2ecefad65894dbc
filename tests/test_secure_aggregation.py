"""Secure aggregation on Flower's simulation engine: the four rounds as query messages, with
dropouts, forged and malformed messages, distributed DP noise and its accounting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtrak.client.ledger import LEDGER_FILE, PrivacyLedger
from fedtrak.config.settings import Settings
from fedtrak.data.partition import partition
from fedtrak.errors import FedtrakError, RunFailed
from fedtrak.privacy.accountant import Release, epsilon
from fedtrak.privacy.budget import Scales
from fedtrak.secagg import fixedpoint
from fedtrak.simulations.attribute import central_scores
from fedtrak.simulations.cli import main
from fedtrak.simulations.faults import faulty_handlers
from fedtrak.simulations.simulate import run_simulation

pytestmark = pytest.mark.flower

K = 128


def _settings(out: Path, ckpts: Path, clients: int, **extra) -> dict:
    return {"clients": clients, "partition": "iid", "partition-seed": 1, "checkpoint-dir": str(ckpts),
            "proj-dim": K, "out": str(out), "secure-agg": True, **extra}


def test_secure_sum_with_dropouts_and_bad_messages_equals_central(tmp_path, logreg_ckpt_dir, digits_logreg,
                                                                   logreg_states):
    """10 clients: one forges its signature, one sends a short masked vector, one drops after sharing
    keys, one before revealing shares. The kernel is exactly the survivors' (within the fixed-point
    bound), every culprit is named, and the server's byte count shows it held masked vectors only."""
    faults = {1: "secagg-forged", 2: "secagg-short", 3: "secagg-drop-input", 4: "secagg-drop-unmask"}
    cfg = Settings.from_flat(_settings(tmp_path, logreg_ckpt_dir, 10, policy="full", **{"allow-full": True}))
    run_simulation(cfg, handlers=faulty_handlers(faults))
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {int(e["owner"]): e["reason"] for e in summary["excluded"]}
    assert "advertisement signature is invalid" in reasons[1]
    length = 3 * K * (K + 1) // 2 + 1  # three Gram upper triangles and the count
    assert f"masked input has shape ({length - 1},)" in reasons[2]
    assert "crashed after sharing its keys" in reasons[3]
    assert "crashed before revealing its shares" in reasons[4]
    secure = summary["secure_aggregation"]
    assert secure["clients"] == 9 and secure["threshold"] == 6 and secure["graph"] == "complete"
    assert secure["survivors"] == 7 and secure["quantization_bound"] == fixedpoint.quantization_bound(7)
    assert set(secure["rounds"]) == {"query.featurize", "query.secagg_share", "query.secagg_input",
                                     "query.secagg_unmask"}
    assert secure["vector_length"] == length
    # the featurize replies carry keys and counts, never a Gram: far less than one Gram upper triangle
    assert secure["rounds"]["query.featurize"]["bytes_received"] < 9 * 1000
    assert summary["privacy"]["dp"] is False
    # Kernel: clients 0 and 4-9 (4 failed only after its masked input was in); scores: 0 and 5-9.
    parts = partition(digits_logreg.y_train, 10, "iid", 0.5, 1)
    kept = (0, 4, 5, 6, 7, 8, 9)
    idx = np.concatenate([parts.clients[c] for c in kept])
    ref, _, _ = central_scores(digits_logreg, logreg_states, digits_logreg.x_train[idx],
                               digits_logreg.y_train[idx], Settings().replaced(proj_dim=K))
    n0, n4 = len(parts.clients[0]), len(parts.clients[4])
    want = np.concatenate([ref[:, :n0], ref[:, n0 + n4:]], axis=1)
    got = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert [o["owner"] for o in summary["owners"]] == ["0", "5", "6", "7", "8", "9"]


def test_garbled_shares_and_wrong_reveals_exclude_their_sender_and_the_sum_goes_on(tmp_path, logreg_ckpt_dir,
                                                                                   digits_logreg, logreg_states):
    """7 clients (threshold 4): client 1 garbles the shares it seals to one peer, which opens them
    on arrival and masks without it; client 3 reveals a share of the wrong kind. Both are excluded
    by name; the kernel is exactly the other survivors' plus 3's (its input was in the sum)."""
    faults = {1: "secagg-garbage-shares", 3: "secagg-bad-reveal"}
    cfg = Settings.from_flat(_settings(tmp_path, logreg_ckpt_dir, 7, policy="full", **{
        "allow-full": True, "secagg-threshold": 0.51}))
    run_simulation(cfg, handlers=faulty_handlers(faults))
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {int(e["owner"]): e["reason"] for e in summary["excluded"]}
    assert sorted(reasons) == [1, 3]
    assert "its sealed shares did not open (failed authentication or malformed) at client" in reasons[1]
    assert "client 3 (node" in reasons[3] and "share of client" in reasons[3] and "expected" in reasons[3]
    assert summary["secure_aggregation"]["survivors"] == 6 and summary["secure_aggregation"]["threshold"] == 4
    parts = partition(digits_logreg.y_train, 7, "iid", 0.5, 1)
    idx = np.concatenate([parts.clients[c] for c in (0, 2, 3, 4, 5, 6)])
    ref, _, _ = central_scores(digits_logreg, logreg_states, digits_logreg.x_train[idx],
                               digits_logreg.y_train[idx], Settings().replaced(proj_dim=K))
    n02, n3 = len(parts.clients[0]) + len(parts.clients[2]), len(parts.clients[3])
    want = np.concatenate([ref[:, :n02], ref[:, n02 + n3:]], axis=1)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert [o["owner"] for o in summary["owners"]] == ["0", "2", "4", "5", "6"]


def test_too_many_dropouts_or_a_misreported_count_give_no_result(tmp_path, logreg_ckpt_dir):
    """3 clients, threshold 2: two dropping after sharing keys leave too few to unmask; a client whose
    masked input claims 100 more examples than it reported spoils the sum, which is refused; so does,
    under DP, one whose Gram is larger than clipped features and the noise can make it."""
    out = tmp_path / "dropped"
    cfg = Settings.from_flat(_settings(out, logreg_ckpt_dir, 3))
    with pytest.raises(FedtrakError, match="only 1 masked inputs for a threshold of 2"):
        run_simulation(cfg, handlers=faulty_handlers({0: "secagg-drop-input", 2: "secagg-drop-input"}))
    assert not (out / "summary.json").exists()
    out = tmp_path / "count"
    cfg = Settings.from_flat(_settings(out, logreg_ckpt_dir, 3))
    with pytest.raises(FedtrakError, match="securely summed count .* differs"):
        run_simulation(cfg, handlers=faulty_handlers({1: "secagg-count"}))
    assert not (out / "summary.json").exists()
    out = tmp_path / "inflated"  # under DP, a Gram larger than clipping allows spoils the sum: no result
    cfg = Settings.from_flat(_settings(out, logreg_ckpt_dir, 3, epsilon=8.0, **{"kernel-source": "private"}))
    with pytest.raises(FedtrakError, match="secure sum of the Grams of checkpoint 0 has diagonal entries.*no result"):
        run_simulation(cfg, handlers=faulty_handlers({2: "secagg-inflate"}))
    assert not (out / "summary.json").exists()


def test_too_few_advertised_keys_end_the_run_before_any_share_and_the_run_folder_says_why(tmp_path, logreg_ckpt_dir,
                                                                                           capfd):
    """3 clients, one of which refuses the job (as a device whose privacy budget cannot pay does):
    2 advertised keys are fewer than the 3 a secure sum needs. The run ends right after the
    advertisement round, before any client is asked for shares or a masked input, with one line
    naming the shortfall and the refusing node, no traceback, and a summary.json (complete: false)
    that the readers of run folders refuse by that reason."""
    out = tmp_path / "refused"
    cfg = Settings.from_flat(_settings(out, logreg_ckpt_dir, 3, checkpoints=1, epsilon=1.0,
                                       **{"kernel-source": "private"}))
    shortfall = (r"secure aggregation: 2 of 3 clients advertised keys, fewer than the 3 a secure sum needs; "
                 r"excluded: node \d+ \(query.featurize failed: featurize: injected refusal: this node's privacy "
                 r"budget cannot pay for the run: the job is refused\)\. No client was asked for shares or a masked "
                 r"input \(no result\); plan at least 4 clients \(secagg-threshold 0.6\), so that one can drop out")
    with pytest.raises(RunFailed, match=shortfall + r" \(recorded in .*summary.json\)$"):
        run_simulation(cfg, handlers=faulty_handlers({1: "refuse"}))
    assert "Traceback" not in capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    failure = summary["failure"]
    assert summary["complete"] is False and summary["run_id"] and summary["config"]["secure-agg"] is True
    assert failure["step"] == "secure aggregation: advertisements"
    assert (failure["clients"], len(failure["advertised"]), failure["needed"], failure["threshold"],
            failure["clients_for_one_dropout"]) == (3, 2, 3, 2, 4)
    assert [e["reason"] for e in failure["excluded"]] == [e["reason"] for e in summary["excluded"]]
    assert "injected refusal" in failure["excluded"][0]["reason"]
    steps = summary["bytes"]["per_step"]  # nobody was sent a share request or an input request
    assert "query.featurize" in steps and not {"query.secagg_share", "query.secagg_input"} & set(steps)
    assert not (out / "owner_scores.npy").exists() and not list(out.glob(".staging-*"))
    ledgers = [PrivacyLedger(p) for p in sorted((out / "client-stores").glob(f"*/{LEDGER_FILE}"))]
    assert len(ledgers) == 2  # the two devices that advertised keys bound the run and released nothing
    assert all(c.releases == [] and c.epsilon == 0 for ledger in ledgers for c in ledger.charges())
    assert main(["report", str(out)]) == 2  # the CLI reads the record and says why there is nothing to show
    err = capfd.readouterr().err
    assert "records a run that ended without results: secure aggregation: 2 of 3 clients" in err
    assert "Traceback" not in err


def test_distributed_noise_is_sized_for_the_threshold_and_accounted_on_the_survivors(tmp_path, logreg_ckpt_dir):
    """epsilon 8 with secure aggregation: the noise is calibrated so that the threshold's 2 honest
    survivors alone give epsilon 8; all 3 survived, so the accounted epsilon is lower, and the kernel
    needs a lower noise floor than 3 clients each adding the full sigma."""
    out = tmp_path / "dp"
    run_simulation(Settings.from_flat(_settings(out, logreg_ckpt_dir, 3, epsilon=8.0, **{"kernel-source": "private"})))
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["secure_aggregation"] and privacy["survivors"] == 3
    assert privacy["epsilon_if_only_threshold_honest"] == pytest.approx(8.0, rel=1e-4)
    assert privacy["epsilon"] < 8.0
    sigma = privacy["noise_multiplier"] * Scales.parse(privacy["budget_scales"]).get("gram")  # the Grams' share
    assert privacy["gram_sigma_effective"] == pytest.approx(sigma * np.sqrt(3 / 2))
    gram = next(r for r in privacy["ledger"] if r["mechanism"] == "skellam")
    assert gram["count"] == 3 and gram["l2"] > 0
    # without secure aggregation the same target needs sigma such that 3 full-noise Grams are summed
    for rec in summary["checkpoints"]:
        # the curvature-weighted Gram's sensitivity is C^2 / 4, and so its noise and floor
        assert privacy["gram_weight"] == 0.25
        floor_plain = 2.2 * sigma * privacy["clip_norm"] ** 2 * 0.25 * np.sqrt(K * 3)
        assert rec["lambda_noise_floor"] == pytest.approx(floor_plain / np.sqrt(2), rel=1e-6)
    assert np.all(np.isfinite(np.load(out / "owner_scores.npy")))
    # the Skellam entry composes in RDP; as Gaussian of the same variance it would be a bit tighter
    tighter = epsilon([Release(**dict(r, mechanism="gaussian")) for r in privacy["ledger"]], privacy["delta"])
    assert tighter < privacy["epsilon"] < 1.15 * tighter
