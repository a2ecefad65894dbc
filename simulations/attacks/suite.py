"""The attacks on one setting or one run folder: ``fedtrak attack`` and ``fedtrak bench attacks``.

:func:`attack_setting` runs the attacks that apply to a release mode on one
client's data and reports reconstruction quality next to the class-mean
baseline and the accounted epsilon; :func:`attack_run` takes the setting from
a finished simulation's folder (task, first checkpoints, projection, clip
norm, noise) and appends the ``attacks`` block to its ``summary.json``, with
the reconstructions in ``attacks.npz`` for the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedtrak.config.settings import (
    DEFAULT_PROJ_DIM,
    KernelSettings,
    Settings,
    releases_gram,
)
from fedtrak.data.checkpoints import load_checkpoints
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.logs import progress_bar
from fedtrak.privacy.accountant import epsilon
from fedtrak.privacy.mechanisms import DPSettings, release_plan
from fedtrak.results.summary import save
from fedtrak.simulations.attacks import metrics
from fedtrak.simulations.attacks.conclusion import holding
from fedtrak.simulations.attacks.inversion import (
    DEFAULT_INVERSION,
    InversionSettings,
    invert_features,
)
from fedtrak.simulations.attacks.membership import membership_attack
from fedtrak.simulations.attacks.small_owner import invert_owner
from fedtrak.simulations.attacks.view import ServerView
from fedtrak.simulations.run_folder import RunFolder
from fedtrak.trak.projectors import resolve_projection

ATTACK_KINDS = ("inversion", "small-owner", "membership")
#: The attacks that rebuild a client's inputs, by gradient descent on inputs of one class each.
RECONSTRUCTIONS = ("inversion", "small-owner")
#: Client sizes of the small-owner attack.
OWNER_SIZES = (1, 2, 4, 16, 64)
#: The report's image strip of the small-owner attack shows a client of at most this many examples.
STRIP_OWNER_SIZE = 4


@dataclass(frozen=True)
class AttackSetting:
    """The releases attacked: mode, projection, privacy and the attacks' budgets."""

    mode: str = "private"
    projector: str = "rademacher"
    proj_dim: int | None = DEFAULT_PROJ_DIM
    seed: int = 0
    weighting: str = "curvature"
    dp: DPSettings = field(default_factory=DPSettings)
    secure_agg: bool = False
    kernel_source: str = "private"
    checkpoints: int = 1
    targets: int = 8
    owner_sizes: tuple[int, ...] = OWNER_SIZES
    trials: int = 400
    inversion: InversionSettings = field(default_factory=InversionSettings)


def why_not_reconstructed(task: Task) -> str | None:
    """Why the reconstruction attacks do not apply to ``task`` (``None``: they do): they optimize
    continuous inputs under a per-class prior, so token ids, named inputs and labels that are not
    one class per example (a language model's) have nothing for them to descend on."""
    x = task.x_train
    if x.dtype.names or not np.issubdtype(x.dtype, np.floating):
        what = f"named inputs ({', '.join(x.dtype.names)})" if x.dtype.names else f"{x.dtype} token ids"
        return f"its inputs are {what}, and the reconstruction attacks rebuild continuous inputs by gradient descent"
    if not task.class_labels:
        return "its labels are not one class per example, and the reconstruction attacks search each example's class"
    return None


def check_attackable(task: Task, what: str) -> None:
    """Refuse ``what``, which runs the reconstruction attacks, for a task they do not apply to.

    Raises:
        FedtrakError: naming the task and the reason.
    """
    why = why_not_reconstructed(task)
    if why is not None:
        raise FedtrakError(f"task {task.name}: {what} (inversion, small-owner), which do not apply to it: {why} "
                           "(the membership attack does)")


def accounted_epsilon(setting: AttackSetting) -> float | None:
    """The accountant's epsilon of one client's releases in this setting (None without noise)."""
    if not setting.dp.active:
        return None
    plan = release_plan(setting.mode, setting.checkpoints, setting.dp, self_influence=False,
                        weighted=KernelSettings(weighting=setting.weighting).weighted,
                        gram_released=releases_gram(setting.kernel_source))
    return round(epsilon(plan, setting.dp.delta), 3)


def _quality(task: Task, x_true: np.ndarray, y_true: np.ndarray, recs: np.ndarray, matched: bool) -> dict:
    true = metrics.as_images(x_true, task.input_shape)
    rec = metrics.as_images(recs, task.input_shape)
    if matched:
        _, ps, ss = metrics.best_match(true, rec)
    else:
        ps = np.array([metrics.psnr(t, r) for t, r in zip(true, rec)])
        ss = np.array([metrics.ssim(t, r) for t, r in zip(true, rec)])
    base = metrics.class_means(task.x_query, task.y_query, task.num_classes, task.input_shape)[y_true]
    return metrics.quality(true, ps, ss, base)


def attack_setting(task: Task, states: list[dict[str, torch.Tensor]], setting: AttackSetting,
                   x_client: np.ndarray, y_client: np.ndarray, x_other: np.ndarray, y_other: np.ndarray,
                   kinds: tuple[str, ...] = ATTACK_KINDS, progress: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Run ``kinds`` against one client holding ``x_client`` (``x_other``: examples it does not
    hold, the membership attack's outsiders). Returns the block and the images for the report.
    ``progress``: a bar of the attacks (each small owner size one), on a terminal."""
    unknown = set(kinds) - set(ATTACK_KINDS)
    if unknown:
        raise FedtrakError(f"unknown attack kind(s) {sorted(unknown)}: use {', '.join(ATTACK_KINDS)}")
    if set(kinds) & set(RECONSTRUCTIONS):
        check_attackable(task, f"the attack asks for {', '.join(k for k in kinds if k in RECONSTRUCTIONS)}")
    settings = Settings().replaced(proj_dim=setting.proj_dim, projector=setting.projector, seed=setting.seed,
                                   weighting=setting.weighting)
    projection = resolve_projection(settings.projection, task.make_model(), task.num_params)
    views = [ServerView(task, s, m, settings, setting.dp, projection, setting.kernel_source)
             for m, s in enumerate(states[: setting.checkpoints])]
    view, rng = views[0], np.random.default_rng([setting.seed, 0xA77AC])
    block: dict = {"mode": setting.mode, "projector": projection.kind, "proj_dim": view.proj_dim,
                   "noise_multiplier": setting.dp.noise_multiplier, "clip_norm": setting.dp.clip_norm or None,
                   "secure_aggregation": setting.secure_agg, "kernel_source": setting.kernel_source,
                   "accounted_epsilon": accounted_epsilon(setting), "checkpoint_attacked": 0}
    if setting.mode == "private" and not view.gram_released:
        block["gram"] = {"skipped": "public kernel: clients release no Gram, there is none to attack"}
    images: dict[str, np.ndarray] = {}
    n = min(setting.targets, len(y_client))
    sizes = [s for s in setting.owner_sizes if s <= len(y_client)] if "small-owner" in kinds else []
    bar = progress_bar(progress, len(sizes) + sum(k in kinds for k in ("inversion", "membership")), "attacks",
                       unit="attack")
    if "inversion" in kinds:
        if setting.mode != "features":
            block["inversion"] = {"skipped": "private mode releases no per-example features"}
        else:
            start = time.perf_counter()
            phi, q, _ = view.client_features(x_client[:n], y_client[:n])
            rel = view.releases(phi, q, "features", rng)
            recs, labels, _ = invert_features(view, rel.features, setting.inversion)
            block["inversion"] = {**_quality(task, x_client[:n], y_client[:n], recs, matched=False),
                                  "labels_correct": round(float((labels == y_client[:n]).mean()), 3),
                                  "seconds": round(time.perf_counter() - start, 1)}
            images["inversion_true"], images["inversion_rec"] = x_client[:n], recs
        bar.update()
    if "small-owner" in kinds:
        if setting.mode != "private":
            block["small_owner"] = {"skipped": "features mode releases every feature (see inversion)"}
        else:
            rows = []
            for size in setting.owner_sizes:
                if size > len(y_client):
                    continue
                start = time.perf_counter()
                phi, q, w = view.client_features(x_client[:size], y_client[:size])
                recs = invert_owner(view, view.releases(phi, q, "private", rng, w), setting.secure_agg,
                                    settings=setting.inversion)
                rows.append({"client_examples": size,
                             **_quality(task, x_client[:size], y_client[:size], recs, matched=True),
                             "reconstructions": len(recs), "seconds": round(time.perf_counter() - start, 1)})
                if size <= STRIP_OWNER_SIZE:  # the report shows the largest client up to this size
                    idx, _, _ = metrics.best_match(metrics.as_images(x_client[:size], task.input_shape),
                                                   metrics.as_images(recs, task.input_shape))
                    images["small_owner_true"], images["small_owner_rec"] = x_client[:size], recs[idx]
                bar.update()
            seen = view.gram_released and not setting.secure_agg
            block["small_owner"] = {"sizes": rows, "release": "client Gram" if seen else "owner summary"}
    if "membership" in kinds:
        if setting.mode != "private":
            block["membership"] = {"skipped": "features mode hides feature values, not their presence"}
        else:
            m = min(setting.targets, len(y_other))
            block["membership"] = membership_attack(views, x_client, y_client, x_other[:m], y_other[:m],
                                                    setting.trials, setting.seed)
        bar.update()
    bar.close()
    return block, images


def attack_run(run_dir: Path, kinds: tuple[str, ...] | None = None, targets: int = 8, trials: int = 400,
               inversion: InversionSettings = DEFAULT_INVERSION, owner_sizes: tuple[int, ...] = OWNER_SIZES,
               progress: bool = False) -> dict:
    """Attack client 0 of a finished simulation's run folder with the run's own settings; append
    the ``attacks`` block to its summary and write ``attacks.npz``. ``kinds``: the attacks to run
    (``None``: every one that applies to the task; the block says why one was skipped); ``progress``:
    a bar of the attacks, on a terminal.

    Raises:
        FedtrakError: if the folder is not a complete simulation run (devices' own data cannot
            be compared with), or its checkpoints are missing.
    """
    run = RunFolder.open(run_dir)
    summary = run.summary
    if summary.mode not in ("private", "features"):
        raise FedtrakError(f"{run_dir} is a {summary.mode} run: it released nothing to attack "
                           "(attack a `fedtrak simulate` run)")
    task, parts = run.task_and_partition()
    if parts is None:
        raise FedtrakError(f"{run_dir}: the attacks compare reconstructions with the clients' true data, "
                           "which only a simulation or attribute run has")
    why = why_not_reconstructed(task)
    skipped = {}
    if kinds is None:
        kinds = ATTACK_KINDS if why is None else tuple(k for k in ATTACK_KINDS if k not in RECONSTRUCTIONS)
        skipped = {} if why is None else {k.replace("-", "_"): {"skipped": f"task {task.name}: {why}"}
                                          for k in RECONSTRUCTIONS}
    elif set(kinds) & set(RECONSTRUCTIONS):
        check_attackable(task, f"the attack asks for {', '.join(k for k in kinds if k in RECONSTRUCTIONS)}")
    num = summary.num_checkpoints
    states = [s for _, s in load_checkpoints(task, run.checkpoint_folder(), num)]
    privacy, settings = summary.privacy, summary.settings
    clients = parts.clients
    own = np.asarray(clients[0])
    other = np.setdiff1d(np.arange(task.num_train), own)
    setting = AttackSetting(mode=summary.mode, projector=summary.projector,
                            proj_dim=summary.proj_dim if summary.projector != "identity" else None,
                            seed=settings.task.seed, weighting=settings.kernel.weighting, dp=summary.dp_settings(),
                            secure_agg=bool(privacy and privacy.secure_aggregation), checkpoints=num, targets=targets,
                            kernel_source=summary.kernel_source,
                            owner_sizes=owner_sizes, trials=trials, inversion=inversion)
    start = time.perf_counter()
    block, images = attack_setting(task, states, setting, task.x_train[own], task.y_train[own],
                                   task.x_train[other], task.y_train[other], kinds, progress)
    block.update(**skipped, client=0, client_size=len(own), run_epsilon=privacy.epsilon if privacy else None, seconds=round(time.perf_counter() - start, 1),
                 threat_model="honest-but-curious server: knows checkpoints, model, projection seed, k, C, sigma")
    if images:
        np.savez_compressed(run.path / "attacks.npz", **images, input_shape=np.array(task.input_shape))
    save(summary.with_attacks(block), run.path)
    return block


def format_block(block: dict) -> str:
    """The attacks block as a few lines of text (the owner-size attack's rows named by the examples
    the attacked owner holds, with what that owner is)."""
    eps, run_eps = block.get("accounted_epsilon"), block.get("run_epsilon")
    lines = [f"{block['mode']} mode, {block['projector']} k = {block['proj_dim']}, "
             f"epsilon {'inf' if eps is None else eps}"
             + ("" if run_eps is None else f" (the attacked client's releases; the whole run's {run_eps:g})")
             + (", secure aggregation" if block["secure_aggregation"] else "")]
    inv = block.get("inversion")
    if inv and "skipped" not in inv:
        lines.append(f"  inversion: PSNR {inv['psnr_mean']} dB, SSIM {inv['ssim_mean']}, recovered "
                     f"{inv['recovered']:.0%} (class mean: PSNR {inv['baseline']['psnr_mean']} dB, "
                     f"recovered {inv['baseline']['recovered']:.0%}), labels {inv['labels_correct']:.0%}")
    owner = block.get("small_owner") or {}
    if owner.get("sizes"):
        size = block.get("client_size")
        lines.append(f"  owner-size attack: client 0 cut down to its first N examples"
                     f"{'' if size is None else f' (it holds {size})'}, its {owner['release']} attacked:")
    for row in owner.get("sizes", []):
        lines.append(f"    {holding(row['client_examples'])}: PSNR {row['psnr_mean']} dB, recovered "
                     f"{row['recovered']:.0%} (class mean {row['baseline']['psnr_mean']} dB)")
    mem = block.get("membership")
    if mem and "skipped" not in mem:
        lines.append(f"  membership: TPR {mem['tpr']}, FPR {mem['fpr']}, empirical epsilon >= "
                     f"{mem['empirical_epsilon_lower_bound']} (accounted {mem['accounted_epsilon'] or 'unbounded: no noise'})")
    return "\n".join(lines)
