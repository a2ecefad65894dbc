"""``fedtrak bench attacks``: the table of what a curious server recovers (docs/privacy.md).

One centrally trained checkpoint of the task (seed 0); client data are the
first training examples, outsiders (for membership) the last ones. For each
epsilon the noise multiplier is calibrated on the attacked mode's release plan
for one checkpoint (``sigma_for_plan``), with the task's default clip norm.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from fedtrak.config.settings import DEFAULT_DELTA, DEFAULT_PROJ_DIM
from fedtrak.data.checkpoints import train_central
from fedtrak.data.tasks import Task, load_task
from fedtrak.privacy.accountant import sigma_for_plan
from fedtrak.privacy.mechanisms import DPSettings, release_plan
from fedtrak.simulations.attacks.figure import strip_figure
from fedtrak.simulations.attacks.inversion import DEFAULT_INVERSION, InversionSettings
from fedtrak.simulations.attacks.suite import (
    OWNER_SIZES,
    AttackSetting,
    attack_setting,
    check_attackable,
)


def attack_dp(task: Task, mode: str, eps: float, checkpoints: int = 1) -> DPSettings:
    """The noise of ``checkpoints`` checkpoints' releases at ``eps`` (infinite: none), for the
    default (curvature-weighted) kernel and the task's clip norm."""
    if math.isinf(eps):
        return DPSettings()
    clip, bound = float(task.clip_norm or 1.0), task.output.curvature_bound
    sigma = sigma_for_plan(eps, lambda s: release_plan(mode, checkpoints, DPSettings(s, clip, gram_weight=bound),
                                                         False, weighted=True), DEFAULT_DELTA)
    return DPSettings(sigma, clip, gram_weight=bound)


def bench_attacks(task_name: str = "digits-logreg", proj_dims: tuple[int | None, ...] = (64, 512, None),
                  epsilons: tuple[float, ...] = (math.inf, 8.0, 1.0), targets: int = 8,
                  owner_sizes: tuple[int, ...] = OWNER_SIZES, owner_dim: int | None = DEFAULT_PROJ_DIM, trials: int = 400,
                  inversion: InversionSettings = DEFAULT_INVERSION, figure: Path | None = None) -> list[dict]:
    """Rows of the attack table: features-mode inversion per k and epsilon, small-owner inversion
    per client size with and without secure aggregation per epsilon, membership per epsilon.
    ``None`` as a k is the identity (no projection). ``figure``: also write a PNG of true and
    rebuilt examples per epsilon (features mode at the second k, a client of 4 through its Gram)."""
    task = load_task(task_name)
    check_attackable(task, "fedtrak bench attacks measures the reconstruction attacks")
    state = train_central(task, seed=0).state_dict()
    inside, outside = slice(0, max(owner_sizes + (targets,))), slice(task.num_train - targets, task.num_train)
    data = (task.x_train[inside], task.y_train[inside], task.x_train[outside], task.y_train[outside])
    rows, strips = [], []
    strip_k = proj_dims[min(1, len(proj_dims) - 1)]
    for eps in epsilons:
        eps_text = "inf" if math.isinf(eps) else f"{eps:g}"
        for k in proj_dims:
            setting = AttackSetting(mode="features", projector="identity" if k is None else "rademacher",
                                    proj_dim=k, dp=attack_dp(task, "features", eps), targets=targets, inversion=inversion)
            block, images = attack_setting(task, [state], setting, *data, kinds=("inversion",))
            if k == strip_k:
                strips.append((f"features, k {block['proj_dim']}\nepsilon {eps_text}", images["inversion_true"],
                               images["inversion_rec"]))
            rows.append({"attack": "inversion (features mode)", "epsilon": eps, "k": block["proj_dim"],
                         "accounted": block["accounted_epsilon"], **_row(block["inversion"])})
        dp = attack_dp(task, "private", eps)
        for secure in (False, True):
            setting = AttackSetting(mode="private", proj_dim=owner_dim, dp=dp, secure_agg=secure,
                                    owner_sizes=owner_sizes, inversion=inversion)
            block, images = attack_setting(task, [state], setting, *data, kinds=("small-owner",))
            if not secure and "small_owner_true" in images:
                strips.append((f"client of {len(images['small_owner_true'])}, Gram\nepsilon {eps_text}",
                               images["small_owner_true"], images["small_owner_rec"]))
            for r in block["small_owner"]["sizes"]:
                rows.append({"attack": f"small owner, {block['small_owner']['release']}", "epsilon": eps,
                             "k": block["proj_dim"], "accounted": block["accounted_epsilon"],
                             "client_examples": r["client_examples"], **_row(r)})
        setting = AttackSetting(mode="private", proj_dim=owner_dim, dp=dp, targets=targets, trials=trials)
        start = time.perf_counter()
        block, _ = attack_setting(task, [state], setting, task.x_train[:64], task.y_train[:64],
                                  task.x_train[outside], task.y_train[outside], kinds=("membership",))
        mem = block["membership"]
        rows.append({"attack": "membership (private mode)", "epsilon": eps, "k": block["proj_dim"],
                     "accounted": block["accounted_epsilon"], "client_examples": 64, "tpr": mem["tpr"],
                     "fpr": mem["fpr"], "empirical_epsilon": mem["empirical_epsilon_lower_bound"],
                     "seconds": round(time.perf_counter() - start, 1)})
    for row in rows:
        row["task"] = task_name
    if figure is not None:
        Path(figure).write_bytes(strip_figure(strips, task.input_shape,
                                              f"{task_name}: true examples and what a curious server rebuilds"))
    return rows


def _row(q: dict) -> dict:
    return {"psnr": q["psnr_mean"], "psnr_std": q["psnr_std"], "ssim": q["ssim_mean"], "recovered": q["recovered"],
            "baseline_psnr": q["baseline"]["psnr_mean"], "baseline_recovered": q["baseline"]["recovered"],
            "seconds": q.get("seconds")}


def _eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def format_table(rows: list[dict]) -> str:
    """Three markdown tables: inversion per k, small owners per size and release, membership;
    cells ``recovered share, mean PSNR dB``, epsilon in the columns."""
    epsilons = list(dict.fromkeys(r["epsilon"] for r in rows))
    head = " | ".join(f"epsilon {_eps(e)}" for e in epsilons)
    rule = "|---" * (len(epsilons) + 1) + "|"

    def cell(r: dict) -> str:
        return f"{r['recovered']:.0%}, {r['psnr']:.1f} dB"

    out = []
    inv = [r for r in rows if r["attack"].startswith("inversion")]
    if inv:
        base = inv[0]
        out += [f"| features mode, k | {head} |", rule]
        for k in dict.fromkeys(r["k"] for r in inv):
            out.append(f"| {k} | " + " | ".join(cell(r) for e in epsilons for r in inv
                                                if r["k"] == k and r["epsilon"] == e) + " |")
        out.append("| class mean (no release) | " + " | ".join(
            f"{base['baseline_recovered']:.0%}, {base['baseline_psnr']:.1f} dB" for _ in epsilons) + " |")
        out.append("")
    owners = [r for r in rows if r["attack"].startswith("small owner")]
    if owners:
        out += [f"| private mode: client examples, release | {head} | class mean |", rule + "---|"]
        for attack in dict.fromkeys(r["attack"] for r in owners):
            for n in dict.fromkeys(r["client_examples"] for r in owners):
                cells = [r for e in epsilons for r in owners
                         if r["attack"] == attack and r["client_examples"] == n and r["epsilon"] == e]
                if cells:
                    out.append(f"| {n}, {attack.removeprefix('small owner, ')} | "
                               + " | ".join(cell(r) for r in cells)
                               + f" | {cells[0]['baseline_recovered']:.0%}, {cells[0]['baseline_psnr']:.1f} dB |")
        out.append("")
    mem = [r for r in rows if r["attack"].startswith("membership")]
    if mem:
        out += ["| membership, private mode | " + head + " |", rule,
                "| TPR / FPR | " + " | ".join(f"{r['tpr']} / {r['fpr']}" for r in mem) + " |",
                "| empirical epsilon (lower bound) | " + " | ".join(str(r["empirical_epsilon"]) for r in mem) + " |",
                "| accounted epsilon | " + " | ".join("-" if r["accounted"] is None else str(r["accounted"])
                                                     for r in mem) + " |"]
    return "\n".join(out)
