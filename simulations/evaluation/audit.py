"""``fedtrak audit``: empirical lower bounds on the epsilon of the Gram and of the owner releases.

The auditor plays the strongest curious server: it knows the client's data
(here the features of one simulated client, clipped as the client clips
them) and everything but which canaries were inserted. Canaries are
examples whose projected feature is ``C e_j`` (norm C, along coordinate j:
the direction in which one example moves the released upper triangle the
most) with the largest kernel weight ``w`` (1 for the plain Gram, the
curvature bound for the weighted one): each moves the release by exactly
the sensitivity ``C^2 w``. In each release every coordinate
gets its canary with probability 1/2; the release is the client's real noised
Gram (:func:`fedtrak.privacy.mechanisms.noised_gram`); the auditor scores
canary j by its inner product with the release, ``e_j^T (G~ - G_data) e_j``,
and guesses "inserted" above a threshold. From the true and false positive
counts at the best threshold, Clopper-Pearson 95% bounds give the epsilon
lower bound ``log((TPR_low - delta) / FPR_high)`` (and the same for the
negatives); the threshold is chosen on half of the canaries and the bound
computed on the other half. It is compared with the accountant's epsilon of one Gram release;
an empirical epsilon above it would be a bug.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from fedtrak.config.settings import DEFAULT_DELTA, DEFAULT_PROJ_DIM, Settings
from fedtrak.data.checkpoints import train_central
from fedtrak.data.partition import partition
from fedtrak.data.tasks import load_task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import Release, epsilon
from fedtrak.privacy.mechanisms import DPSettings, clip_scales, noise_rng, noised_gram
from fedtrak.privacy.plan import kernel_weight_bound
from fedtrak.trak.kernel import gram
from fedtrak.trak.per_checkpoint import checkpoint_featurizer
from fedtrak.trak.projectors import Projection

#: Confidence of the Clopper-Pearson bounds.
CONFIDENCE = 0.95


def _cp_low(successes: int, trials: int, alpha: float) -> float:
    return 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))


def _cp_high(successes: int, trials: int, alpha: float) -> float:
    return 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))


def _test_bound(pos: np.ndarray, neg: np.ndarray, t: float, positive: bool, delta: float) -> float:
    """The epsilon lower bound of one test: "inserted" above ``t`` (``positive``) or "absent" at or
    below it, from Clopper-Pearson bounds on its two error rates (Bonferroni over the two)."""
    alpha = (1 - CONFIDENCE) / 2
    tp, fp = int((pos > t).sum()), int((neg > t).sum())
    hit, hits, miss, misses = (tp, len(pos), fp, len(neg)) if positive else \
        (len(neg) - fp, len(neg), len(pos) - tp, len(pos))
    low, high = _cp_low(hit, hits, alpha), _cp_high(miss, misses, alpha)
    return math.log((low - delta) / high) if low - delta > 0 and high > 0 else 0.0


def epsilon_lower_bound(scores: np.ndarray, inserted: np.ndarray, delta: float,
                        held_out: bool = False) -> tuple[float, float]:
    """The largest empirical epsilon lower bound over thresholds (and the two directions), and its
    threshold. With ``held_out``, the test is chosen on a random half of the trials and its bound
    computed on the other half: choosing it on the trials it bounds overstates the bound (the
    canary audit does this; the membership attack reports the optimistic one)."""
    scores, inserted = np.asarray(scores), np.asarray(inserted, dtype=bool)
    if not inserted.any() or inserted.all():
        raise FedtrakError("the audit needs both inserted and absent canaries")
    choose = judge = np.ones(len(scores), dtype=bool)
    if held_out:
        choose = np.zeros(len(scores), dtype=bool)
        choose[np.random.default_rng(0xA0D1).permutation(len(scores))[: len(scores) // 2]] = True
        judge = ~choose
        if not (inserted[judge].any() and (~inserted[judge]).any()):
            raise FedtrakError("the audit needs both inserted and absent canaries in each half")
    pos, neg = scores[choose & inserted], scores[choose & ~inserted]
    best, best_t, best_dir = 0.0, float("nan"), True
    for t in np.quantile(scores[choose], np.linspace(0.01, 0.99, 99)):
        for positive in (True, False):
            value = _test_bound(pos, neg, float(t), positive, delta)
            if value > best:
                best, best_t, best_dir = value, float(t), positive
    if held_out and best > 0:
        best = max(0.0, _test_bound(scores[judge & inserted], scores[judge & ~inserted], best_t, best_dir, delta))
    return best, best_t


def audit_gram(
    task_name: str = "digits-logreg",
    noise_multiplier: float = 1.0,
    clip_norm: float | None = None,
    proj_dim: int = DEFAULT_PROJ_DIM,
    releases: int = 20,
    clients: int = 10,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
    weighting: str = "curvature",
) -> dict:
    """Audit the Gram release of client 0 of ``clients`` (a checkpoint trained on the task) under
    the kernel ``weighting``.

    Returns the empirical epsilon lower bound, the accountant's epsilon of one
    release and the counts behind them.
    """
    task = load_task(task_name)
    clip = clip_norm or task.clip_norm
    settings = Settings().replaced(seed=seed, weighting=weighting)
    bound = kernel_weight_bound(settings.kernel.weighted, task)
    dp = DPSettings(noise_multiplier, float(clip or 0.0), delta=delta, gram_weight=bound)
    dp.validate()
    if not dp.active:
        raise FedtrakError("the audit needs noise: give a positive noise multiplier")
    if releases < 1:
        raise FedtrakError(f"the audit needs at least one release, got {releases}")
    model = train_central(task, seed)
    idx = partition(task.y_train, clients, "iid", seed=seed).clients[0]
    featurized = checkpoint_featurizer(task, model.state_dict(), 0, settings, Projection("rademacher", proj_dim))\
        .featurize(task.x_train[idx], task.y_train[idx])
    features = featurized.features.astype(np.float64)
    features *= clip_scales(np.linalg.norm(features, axis=1)[None, :], dp.clip_norm, dp.clip_mode)[0][:, None]
    base = gram(features, featurized.curvature if settings.kernel.weighted else None)
    k = base.shape[0]
    rng, coins = noise_rng(), np.random.default_rng([seed, 0xA0D17])
    inserted = coins.random((releases, k)) < 0.5
    scores = np.empty((releases, k))
    for r in range(releases):
        release = noised_gram(base + np.diag(inserted[r] * dp.gram_sensitivity), dp, rng)
        scores[r] = np.diag(release - base) / dp.gram_sensitivity  # canary j's inner product with the release
    eps_lb, threshold = epsilon_lower_bound(scores.ravel(), inserted.ravel(), delta, held_out=True)
    accounted = epsilon([Release("Gram", noise_multiplier)], delta)
    return {"task": task_name, "weighting": weighting, "gram_sensitivity": dp.gram_sensitivity,
            "noise_multiplier": noise_multiplier, "clip_norm": dp.clip_norm, "proj_dim": k,
            "client_examples": len(idx), "releases": releases, "canaries": int(inserted.size),
            "inserted": int(inserted.sum()), "delta": delta, "empirical_epsilon_lower_bound": eps_lb,
            "threshold": threshold, "accounted_epsilon_one_release": accounted,
            "confidence": CONFIDENCE}


def audit_owner_releases(noise_multiplier: float = 1.0, trials: int = 4000, examples: int = 100,
                         proj_dim: int = 32, delta: float = DEFAULT_DELTA, seed: int = 0) -> dict:
    """Audit the two one-number owner releases through the client's own code: the suspect count
    (``noised_suspect_count`` of ``score_in_chunks``'s count) and the owner value (its examples'
    contributions clipped to the server's bound ``B``, then ``noised_owner_values``).

    In each trial a canary joins the owner's ``examples`` with probability 1/2. It is the worst
    case for each release: a suspect far above the threshold, and an example whose value
    contribution is far above ``B`` (clipped to exactly ``B``). The auditor knows everything but
    the coin, scores a release by its excess over the canary-free value (in units of the
    sensitivity) and turns the true and false positive rates into an epsilon lower bound
    (:func:`epsilon_lower_bound`), compared with the accountant's epsilon of one release.
    """
    from fedtrak.client.local_scoring import score_in_chunks
    from fedtrak.privacy.mechanisms import noised_owner_values, noised_suspect_count

    if not noise_multiplier > 0 or trials < 2:
        raise FedtrakError("the audit needs a positive noise multiplier and at least 2 trials")
    data = np.random.default_rng([seed, 0xA0D18])
    features = data.standard_normal((examples, proj_dim)).astype(np.float32)
    weights = data.uniform(0.0, 1.0, examples).astype(np.float32)
    queries = data.standard_normal((5, proj_dim))
    inverse = np.eye(proj_dim) / examples
    groups = queries.sum(axis=0, keepdims=True)  # one group: every query
    canary = (50 * groups[0] / np.linalg.norm(groups[0])).astype(np.float32)[None, :]
    plain = score_in_chunks([features], [weights], [queries], [inverse], groups=[groups])
    threshold = float(np.max(plain.self_influence)) * 2  # no data example is a suspect; the canary is
    bound = float(abs(plain.values[0])) / examples  # the server's bound: about one example's mean share
    dp = DPSettings(noise_multiplier, 1.0, delta=delta)
    rng, coins = noise_rng(), np.random.default_rng([seed, 0xC014])
    inserted = coins.random(trials) < 0.5
    with_canary = score_in_chunks([np.vstack([features, canary])], [np.append(weights, np.float32(1.0))], [queries],
                                  [inverse], groups=[groups], suspect_threshold=threshold, value_clip=bound)
    without = score_in_chunks([features], [weights], [queries], [inverse], groups=[groups],
                              suspect_threshold=threshold, value_clip=bound)
    if with_canary.suspects != without.suspects + 1:
        raise FedtrakError("audit set-up: the canary is not a suspect")
    out = {"noise_multiplier": noise_multiplier, "trials": trials, "inserted": int(inserted.sum()), "delta": delta,
           "value_bound": bound,
           "accounted_epsilon_one_release": epsilon([Release("one release", noise_multiplier)], delta),
           "confidence": CONFIDENCE}
    releases = {
        "suspect_count": (lambda s: noised_suspect_count(s.suspects, dp, rng), without.suspects, 1.0),
        "owner_value": (lambda s: noised_owner_values(s.values, [groups], dp, rng, bound)[0], without.values[0],
                        float(with_canary.values[0] - without.values[0])),
    }
    for name, (release, base, step) in releases.items():
        scores = np.array([(release(with_canary if i else without) - base) / step for i in inserted])
        eps_lb, threshold_found = epsilon_lower_bound(scores, inserted, delta, held_out=True)
        out[name] = {"sensitivity_step": step, "empirical_epsilon_lower_bound": eps_lb, "threshold": threshold_found}
    return out
