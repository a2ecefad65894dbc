"""``fedtrak audit``: an empirical lower bound on the epsilon of the Gram release.

The auditor plays the strongest curious server: it knows the client's data
(here the features of one simulated client, clipped as the client clips
them) and everything but which canaries were inserted. Canaries are
examples whose projected feature is ``C e_j`` (norm C, along coordinate j:
the direction in which one example moves the released upper triangle the
most) with the largest kernel weight ``w`` (1 for the plain Gram, the
curvature bound for the weighted one): each moves the release by exactly
the sensitivity ``C^2 w``. In each release every coordinate
gets its canary with probability 1/2; the release is the client's real noised
Gram (:func:`fedtrak.privacy.mechanisms.gram_noise`); the auditor scores
canary j by its inner product with the release, ``e_j^T (G~ - G_data) e_j``,
and guesses "inserted" above a threshold. From the true and false positive
counts at the best threshold, Clopper-Pearson 95% bounds give the epsilon
lower bound ``log((TPR_low - delta) / FPR_high)`` (and the same for the
negatives). It is compared with the accountant's epsilon of one Gram release;
an empirical epsilon above it would be a bug.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from fedtrak.checkpoints import train_central
from fedtrak.errors import FedtrakError
from fedtrak.kernel import gram
from fedtrak.partition import partition
from fedtrak.privacy.accountant import Release, epsilon
from fedtrak.privacy.mechanisms import DPSettings, clip_scales, gram_noise, noise_rng
from fedtrak.settings import Settings
from fedtrak.tasks import load_task
from fedtrak.trak import checkpoint_featurizer

#: Confidence of the Clopper-Pearson bounds.
CONFIDENCE = 0.95


def _cp_low(successes: int, trials: int, alpha: float) -> float:
    return 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))


def _cp_high(successes: int, trials: int, alpha: float) -> float:
    return 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))


def epsilon_lower_bound(scores: np.ndarray, inserted: np.ndarray, delta: float) -> tuple[float, float]:
    """The largest empirical epsilon lower bound over thresholds, and its threshold.

    Bounds use one-sided Clopper-Pearson intervals at :data:`CONFIDENCE`,
    split over the two rates (Bonferroni).
    """
    pos, neg = scores[inserted], scores[~inserted]
    if not len(pos) or not len(neg):
        raise FedtrakError("the audit needs both inserted and absent canaries")
    alpha = (1 - CONFIDENCE) / 2
    best, best_t = 0.0, float("nan")
    for t in np.quantile(scores, np.linspace(0.01, 0.99, 99)):
        tp, fp = int((pos > t).sum()), int((neg > t).sum())
        tn, fn = len(neg) - fp, len(pos) - tp
        for hit, hits, miss, misses in ((tp, len(pos), fp, len(neg)), (tn, len(neg), fn, len(pos))):
            low, high = _cp_low(hit, hits, alpha), _cp_high(miss, misses, alpha)
            if low - delta > 0 and high > 0:
                value = math.log((low - delta) / high)
                if value > best:
                    best, best_t = value, float(t)
    return best, best_t


def audit_gram(
    task_name: str = "digits-logreg",
    noise_multiplier: float = 1.0,
    clip_norm: float | None = None,
    proj_dim: int = 512,
    releases: int = 20,
    clients: int = 10,
    delta: float = 1e-5,
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
    bound = task.output.curvature_bound if weighting == "curvature" else 1.0
    dp = DPSettings(noise_multiplier, float(clip or 0.0), delta=delta, gram_weight=bound)
    dp.validate()
    if not dp.active:
        raise FedtrakError("the audit needs noise: give a positive noise multiplier")
    if releases < 1:
        raise FedtrakError(f"the audit needs at least one release, got {releases}")
    model = train_central(task, seed)
    idx = partition(task.y_train, clients, "iid", seed=seed).clients[0]
    featurized = checkpoint_featurizer(task, model.state_dict(), 0, Settings().replaced(proj_dim=proj_dim, seed=seed))\
        .featurize(task.x_train[idx], task.y_train[idx])
    features = featurized.features.astype(np.float64)
    features *= clip_scales(np.linalg.norm(features, axis=1)[None, :], dp.clip_norm, dp.clip_mode)[0][:, None]
    base = gram(features, featurized.curvature if weighting == "curvature" else None)
    k = base.shape[0]
    rng, coins = noise_rng(), np.random.default_rng([seed, 0xA0D17])
    inserted = coins.random((releases, k)) < 0.5
    scores = np.empty((releases, k))
    for r in range(releases):
        release = base + np.diag(inserted[r] * dp.gram_sensitivity) + gram_noise(k, dp, rng)
        scores[r] = np.diag(release - base) / dp.gram_sensitivity  # canary j's inner product with the release
    eps_lb, threshold = epsilon_lower_bound(scores.ravel(), inserted.ravel(), delta)
    accounted = epsilon([Release("Gram", noise_multiplier)], delta)
    return {"task": task_name, "weighting": weighting, "gram_sensitivity": dp.gram_sensitivity,
            "noise_multiplier": noise_multiplier, "clip_norm": dp.clip_norm, "proj_dim": k,
            "client_examples": len(idx), "releases": releases, "canaries": int(inserted.size),
            "inserted": int(inserted.sum()), "delta": delta, "empirical_epsilon_lower_bound": eps_lb,
            "threshold": threshold, "accounted_epsilon_one_release": accounted,
            "confidence": CONFIDENCE}
