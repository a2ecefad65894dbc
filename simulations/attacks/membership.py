"""Membership inference on a client's private-mode releases, and its empirical epsilon.

The question: is example z in this client's data? The attacker is the
strongest curious server, as in ``fedtrak audit``: it knows z, the rest of the
client's data, the checkpoints and the projection, and sees one run's
releases (every checkpoint's Gram, unless the kernel is public, the count and
every owner summary, noised as the client noises them). For Gaussian releases its best test (Neyman-
Pearson) sums, over releases, the inner product of z's contribution with the
release minus the rest's, divided by the noise variance. Over many trials with
z in or out at random, the true and false positive rates at the best
threshold give an empirical epsilon lower bound (Clopper-Pearson, as the
canary audit), which must stay below the accountant's epsilon of the same
releases. Without noise the count alone gives membership away. Under secure
aggregation the server sees the sum of all Grams, whose noise reaches the
same sigma: a server that knows every other client's data faces the same
test, so the attack is the same.

Features mode is not attacked here: its noise covers the values of the
features, not their presence (its release plan says so), so a client's
number of released rows shows membership under any epsilon.
"""

from __future__ import annotations

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.privacy.accountant import epsilon
from fedtrak.privacy.budget import COUNT, GRAM, SUMMARY
from fedtrak.privacy.mechanisms import release_plan
from fedtrak.simulations.attacks.view import ServerView
from fedtrak.simulations.evaluation.audit import CONFIDENCE, epsilon_lower_bound
from fedtrak.trak.kernel import gram


def membership_attack(views: list[ServerView], x_rest: np.ndarray, y_rest: np.ndarray, x_targets: np.ndarray,
                      y_targets: np.ndarray, trials: int = 400, seed: int = 0) -> dict:
    """Run ``trials`` membership games against one client; each target example in turn is
    inserted with probability 1/2. Returns rates, the empirical epsilon bound and the accountant's."""
    if trials < 2:
        raise FedtrakError(f"the membership attack needs at least 2 trials, got {trials}")
    dp = views[0].dp
    rest, cand = [], []
    for v in views:
        rest.append(v.client_features(x_rest, y_rest))
        cand.append(v.client_features(x_targets, y_targets))
    # qbar: out-to-loss averaged over checkpoints, per example, as the client computes it
    qbar_rest = np.mean([q for _, q, _ in rest], axis=0)
    qbar_cand = np.mean([q for _, q, _ in cand], axis=0)
    var_gram = (dp.sigma(GRAM) * dp.gram_sensitivity) ** 2 if dp.active else 1.0
    var_summary = (dp.sigma(SUMMARY) * dp.clip_norm) ** 2 if dp.active else 1.0
    var_count = dp.sigma(COUNT) ** 2 if dp.active else 1.0
    coins = np.random.default_rng([seed, 0x3E3B])
    rng = np.random.default_rng([seed, 0x4015E])
    inserted = coins.random(trials) < 0.5
    # what the rest of the client's data contributes, known to this attacker: once per checkpoint
    known = [(gram(phi_r, w_r), qbar_rest @ phi_r) for phi_r, _, w_r in rest]
    scores = np.empty(trials)
    for t in range(trials):
        j = t % len(y_targets)
        score = 0.0
        for v, (phi_r, _, w_r), (phi_c, _, w_c), (gram_r, summary_r) in zip(views, rest, cand, known):
            z = phi_c[j : j + 1]
            wz = None if w_c is None else w_c[j : j + 1]
            phi = np.vstack([phi_r, z]) if inserted[t] else phi_r
            q = np.append(qbar_rest, qbar_cand[j]) if inserted[t] else qbar_rest
            w = None if w_r is None else (np.append(w_r, wz) if inserted[t] else w_r)
            rel = v.releases(phi, q, "private", rng, w)
            shift_g = np.triu(gram(z, wz))
            if rel.gram is not None:  # a public kernel: no Gram is released
                score += float((shift_g * np.triu(rel.gram - gram_r)).sum()) / var_gram
            shift_s = qbar_cand[j] * z[0]
            score += float(shift_s @ (rel.summary - summary_r)) / var_summary
        score += (rel.count - len(y_rest)) / var_count  # the count is released once per run
        scores[t] = score
    eps_lb, threshold = epsilon_lower_bound(scores, inserted, dp.delta)
    pos, neg = scores[inserted], scores[~inserted]
    plan = release_plan("private", len(views), dp, self_influence=False, gram_released=views[0].gram_released)
    return {"trials": trials, "targets": len(y_targets), "client_examples": len(y_rest),
            "checkpoints": len(views), "noise_multiplier": dp.noise_multiplier,
            "tpr": round(float((pos > threshold).mean()), 3), "fpr": round(float((neg > threshold).mean()), 3),
            "empirical_epsilon_lower_bound": round(eps_lb, 3),
            "accounted_epsilon": round(epsilon(plan, dp.delta), 3) if dp.active else None,
            "confidence": CONFIDENCE}
