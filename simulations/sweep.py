"""``fedtrak sweep``: attribution quality against epsilon, per mode (the privacy/utility trade-off).

One set of checkpoints is trained first (centralized SGD on the task's
training data with a fraction of labels flipped on half the clients, so
mislabel detection can be measured) and shared by every point. Each line of
the sweep is a mode and, in private mode, a kernel source and secure
aggregation choice (:class:`Variant`). At each (line, epsilon) a federated run on Flower's simulation engine attributes
with differential privacy at that epsilon (``inf``: no noise), releasing
full scores for evaluation only; ``fedtrak evaluate`` then measures LDS,
owner-level LDS (from the noised owner releases) and mislabel detection,
all against one cached set of retrained models, and ``fedtrak attack``
measures what a curious server rebuilds from the same releases (features
mode: feature inversion; private mode: a one-example client's Gram, or its
owner summary under secure aggregation, and membership inference). The table goes to
``sweep.csv`` and ``sweep.md``, the plot to ``sweep.png``; every run folder
is kept under ``OUT``, with its row in ``sweep-point.json``: run the same sweep again
(after a crash, or with more epsilons) and finished points are not measured again. Each point's row
goes to :attr:`SweepConfig.on_point` as it finishes; the words of the output are in
:mod:`fedtrak.simulations.evaluation.sweep_text`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedtrak.config.settings import KERNEL_SOURCES, MODES, Settings
from fedtrak.data.checkpoints import train_checkpoints
from fedtrak.data.corruption import corrupted
from fedtrak.data.partition import partition
from fedtrak.data.tasks import load_task
from fedtrak.errors import FedtrakError
from fedtrak.logs import progress_bar
from fedtrak.simulations.attacks.inversion import InversionSettings
from fedtrak.simulations.attacks.metrics import RECOGNIZABLE_PSNR
from fedtrak.simulations.attacks.suite import attack_run, why_not_reconstructed
from fedtrak.simulations.evaluation.evaluate import EvalOptions, evaluate_run
from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE
from fedtrak.simulations.evaluation.sweep_text import eps_text, format_table, line_of
from fedtrak.simulations.simulate import run_simulation

#: Secure aggregation choices of a variant: the default rule (on under DP wherever Grams are released), on, off.
SECURE_AGG_CHOICES = {"default": None, "on": True, "off": False}


@dataclass(frozen=True)
class Variant:
    """One line of a sweep: a mode and, in private mode, a kernel source and secure aggregation
    (``None``: the default rule)."""

    mode: str
    kernel_source: str = "auto"
    secure_agg: bool | None = None

    @property
    def label(self) -> str:
        """The line's name, each choice said once: the mode alone for the defaults, else with the
        kernel source and secure aggregation chosen (``private mode, hybrid kernel, secagg``)."""
        words = [f"{self.mode} mode"]
        if self.mode == "private" and self.kernel_source != "auto":
            words.append(f"{self.kernel_source} kernel")
        if self.mode == "private" and self.secure_agg is not None:
            words.append("secagg" if self.secure_agg else "no secagg")
        return ", ".join(words)

    @property
    def slug(self) -> str:
        """The line's folder name (as sweeps before the names above wrote it, so their points are reused)."""
        if self.mode != "private" or (self.kernel_source, self.secure_agg) == ("auto", None):
            return self.mode
        sa = {None: "", True: "-secagg", False: "-no-secagg"}[self.secure_agg]
        return f"{self.mode}-{self.kernel_source}{sa}"


def variants(modes: Sequence[str], sources: Sequence[str] = ("auto",),
             secure_aggs: Sequence[bool | None] = (None,)) -> list[Variant]:
    """Every mode's lines: features mode once; private mode once per kernel source and secure
    aggregation choice (a public kernel, which releases no Gram, without forced secure aggregation)."""
    out = []
    for mode in modes:
        if mode != "private":
            out.append(Variant(mode))
            continue
        out.extend(Variant(mode, src, sa) for src in sources for sa in secure_aggs if not (src == "public" and sa))
    return list(dict.fromkeys(out))


@dataclass
class SweepConfig:
    """A sweep: the settings every point shares (``base``) and what varies and is measured.

    Each point runs ``base`` with its mode and epsilon, the ``full`` policy (so it can be
    evaluated), self-influence and a mislabel experiment's flips, on checkpoints trained once.
    """

    out: Path
    base: Settings = field(default_factory=lambda: Settings().replaced(flip_fraction=0.1))
    epsilons: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
    modes: Sequence[str] = ("private", "features")
    kernel_sources: Sequence[str] = ("auto",)
    secure_aggs: Sequence[bool | None] = (None,)
    subsets: int = 100
    attack_targets: int = 8
    cache_dir: Path = DEFAULT_CACHE
    progress: bool = True
    #: Called with each point's row as it finishes, and whether it was reused from an earlier sweep.
    on_point: Callable[[dict, bool], None] | None = None

    def validate(self) -> None:
        """Raise FedtrakError on an empty or non-positive epsilon list, an unknown mode or kernel
        source, or no secure aggregation choice."""
        if not self.epsilons or any(not e > 0 for e in self.epsilons):
            raise FedtrakError(f"epsilons must be positive (or inf), got {list(self.epsilons)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise FedtrakError(f"modes {bad or '[]'}: use {', '.join(MODES)}")
        bad = [k for k in self.kernel_sources if k not in KERNEL_SOURCES]
        if bad or not self.kernel_sources:
            raise FedtrakError(f"kernel sources {bad or '[]'}: use {', '.join(KERNEL_SOURCES)}")
        if not self.secure_aggs:
            raise FedtrakError("give at least one secure aggregation choice")


def _point_dir(out: Path, variant: Variant, eps: float) -> Path:
    return out / f"{variant.slug}-eps-{'inf' if math.isinf(eps) else f'{eps:g}'}"


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Run every (mode, epsilon) point and write the table and plot; return the rows."""
    cfg.validate()
    out, base = Path(cfg.out), cfg.base
    p = base.partition
    task = load_task(base.task.task, base.task.train_size, base.task.query_size)
    task.check_label_settings(base)
    reconstructs = why_not_reconstructed(task) is None  # else membership only (token ids: nothing to descend on)
    parts = partition(task.y_train, p.clients, p.partition, p.alpha, p.partition_seed, groups=task.train_groups)
    ckpt_dir = out / "checkpoints"
    if not (ckpt_dir / "manifest.json").exists():
        train_checkpoints(corrupted(task, parts, base.flips()), base.training.checkpoints, ckpt_dir, base.task.seed)
    points = [(v, eps) for v in variants(cfg.modes, cfg.kernel_sources, cfg.secure_aggs) for eps in cfg.epsilons]
    rows = []
    with progress_bar(cfg.progress, len(points), "sweep", unit="point") as bar:
        for variant, eps in points:
            rows.append(_point(cfg, variant, eps, ckpt_dir, reconstructs))
            bar.update(1)
    write_table(rows, out)
    plot(rows, out / "sweep.png", base.task.task)
    return rows


def _point(cfg: SweepConfig, variant: Variant, eps: float, ckpt_dir: Path, reconstructs: bool) -> dict:
    """One point's row: measured (simulation, evaluation, attacks), or read back where an earlier
    sweep measured it with the same settings; handed to ``cfg.on_point`` when done."""
    mode = variant.mode
    run = _point_dir(Path(cfg.out), variant, eps)
    settings = cfg.base.replaced(mode=mode, policy="full", allow_full=True, self_influence=True,
                                 checkpoint_dir=str(ckpt_dir.resolve()), out=str(run.resolve()),
                                 epsilon=None if math.isinf(eps) else float(eps),
                                 kernel_source=variant.kernel_source if mode == "private" else "auto",
                                 secure_agg=variant.secure_agg)
    key = {"settings": settings.flat(), "subsets": cfg.subsets, "attack_targets": cfg.attack_targets}
    done, start = _finished_row(run, key), time.perf_counter()
    if done is not None:
        row = {**done, "line": variant.label}  # named as today's sweeps name it
    else:
        summary = run_simulation(settings)
        block = evaluate_run(run, EvalOptions(subsets=cfg.subsets, owner_subsets=cfg.subsets, seed=0, ceiling=False,
                                              cache_dir=cfg.cache_dir, progress=False))
        privacy = summary.privacy
        mis = block.get("mislabel", {})
        attack = _attack_measures(run, mode, cfg.attack_targets, reconstructs)
        row = {
            "line": variant.label, "mode": mode, "kernel_source": summary.kernel_source,
            "secure_aggregation": bool(privacy and privacy.secure_aggregation), "epsilon": eps,
            "sigma": privacy.noise_multiplier if privacy else 0.0,
            "lds": block["lds"]["lds"], "lds_ci_low": block["lds"]["ci_low"], "lds_ci_high": block["lds"]["ci_high"],
            "owner_lds": block["owner_lds"]["lds"], "owner_lds_ci_low": block["owner_lds"]["ci_low"],
            "owner_lds_ci_high": block["owner_lds"]["ci_high"],
            "mislabel_auroc": mis.get("examples", {}).get("auroc", float("nan")),
            "mislabel_auroc_owners": mis.get("owners", {}).get("auroc", float("nan")),
            **attack, "seconds": summary.total_seconds, "point_seconds": round(time.perf_counter() - start, 1),
        }
        (run / POINT_FILE).write_text(json.dumps({**key, "row": row}, default=_json_number))
    if cfg.on_point:
        cfg.on_point(row, done is not None)
    return row


#: A finished point's row and what it was measured with, beside its run folder: a sweep run again
#: (after a crash, or with more epsilons) reuses it instead of measuring the point again.
POINT_FILE = "sweep-point.json"


def _json_number(v: object) -> object:
    return float(v)  # numpy scalars


def _finished_row(run: Path, key: dict) -> dict | None:
    """The row stored for this point if it was measured with the same settings, else None."""
    try:
        stored = json.loads((run / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if {k: stored.get(k) for k in key} != json.loads(json.dumps(key, default=_json_number)):
        return None
    row = stored["row"]
    return {**row, "epsilon": float(row["epsilon"])}


def _attack_measures(run: Path, mode: str, targets: int, reconstructs: bool = True) -> dict:
    """Attack success at one point: the share of attacked examples rebuilt recognizably (features
    mode: inversion of released features; private mode: a client holding one example), the
    class-mean baseline's share, and the membership attack's empirical epsilon (private mode).
    Where the reconstruction attacks do not apply (``reconstructs`` false: token ids), only the
    membership attack runs and the reconstruction measures are NaN."""
    kinds = ("inversion",) if mode == "features" else ("small-owner", "membership")
    kinds = kinds if reconstructs else tuple(k for k in kinds if k == "membership")
    nan = float("nan")
    block = attack_run(run, kinds, targets=targets, trials=200, inversion=InversionSettings(steps=200),
                       owner_sizes=(1,)) if kinds else {}
    quality = (block["inversion"] if mode == "features" else block["small_owner"]["sizes"][0]) if reconstructs else {}
    mem = block.get("membership", {})
    return {"attack_recovered": quality.get("recovered", nan), "attack_psnr": quality.get("psnr_mean", nan),
            "attack_baseline_psnr": quality.get("baseline", {}).get("psnr_mean", nan),
            "membership_epsilon": mem.get("empirical_epsilon_lower_bound", nan)}


def write_table(rows: list[dict], out: Path) -> None:
    """``sweep.csv`` and ``sweep.md``."""
    with open(out / "sweep.csv", "w", newline="") as fh:
        # every row's keys, in order: rows reused from older sweeps may lack a newer column (point_seconds)
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows({**r, "epsilon": eps_text(r["epsilon"])} for r in rows)
    (out / "sweep.md").write_text(format_table(rows) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """LDS, owner-level LDS and mislabel AUROC against epsilon, one line per mode (inf at the right)."""
    finite = sorted({r["epsilon"] for r in rows if not math.isinf(r["epsilon"])})
    inf_x = (finite[-1] * 4) if finite else 1.0

    def x(eps: float) -> float:
        return inf_x if math.isinf(eps) else eps

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [("lds", "LDS"), ("owner_lds", "owner-level LDS"), ("mislabel_auroc", "mislabel AUROC (examples)"),
              ("attack_psnr", "attack: PSNR of rebuilt examples (dB)")]
    for ax, (key, label) in zip(axes, panels):
        for mode in dict.fromkeys(line_of(r) for r in rows):
            pts = sorted(((x(r["epsilon"]), r) for r in rows if line_of(r) == mode), key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [p[1][key] for p in pts]
            line = ax.plot(xs, ys, marker="o", label=mode)[0]
            if key == "attack_psnr":
                ax.plot(xs, [p[1]["attack_baseline_psnr"] for p in pts], ls=":", color=line.get_color(),
                        label=f"{mode}: class mean")
            elif key != "mislabel_auroc":
                lo = [p[1][f"{key}_ci_low"] for p in pts]
                hi = [p[1][f"{key}_ci_high"] for p in pts]
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
            else:
                owners = [p[1]["mislabel_auroc_owners"] for p in pts]
                ax.plot(xs, owners, ls="--", marker="x", color=line.get_color(), label=f"{mode} (owners)")
        ax.set_xscale("log")
        ticks = [*finite, inf_x]
        ax.set_xticks(ticks)
        ax.set_xticklabels([*(f"{e:g}" for e in finite), "inf"], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("epsilon (whole run, delta 1e-5)", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.axhline({"mislabel_auroc": 0.5, "attack_psnr": RECOGNIZABLE_PSNR}.get(key, 0), color="gray", lw=0.6)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: attribution quality against epsilon, and what a curious server rebuilds "
                 f"(grey line: recognizable, PSNR {RECOGNIZABLE_PSNR:g} dB)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
