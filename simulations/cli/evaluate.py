"""``fedtrak evaluate``, ``report``, ``attack``, ``sweep`` and ``audit``: judging a run and its privacy."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

from fedtrak.config.settings import DEFAULT_PROJ_DIM
from fedtrak.errors import FedtrakError
from fedtrak.simulations.cli.flags import (
    add_json,
    add_settings,
    fraction,
    positive_int,
    settings_from,
)

#: The settings a sweep's points share, offered as its options.
SWEEP_KEYS = ["task", "train-size", "query-size", "clients", "partition", "alpha", "checkpoints", "projector", "proj-dim",
              "flip-fraction", "clip-mode", "budget", "seed"]
ATTACK_KINDS = ("inversion", "small-owner", "membership")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder written by attribute or simulate")
    p.add_argument("--lds", action="store_true", help="LDS of the example scores")
    p.add_argument("--owner-lds", action="store_true", help="LDS of the owner totals")
    p.add_argument("--mislabel", action="store_true", help="flipped-label detection by self-influence")
    p.add_argument("--owner-value", action="store_true",
                   help="owner values against each owner's removal effect (runs made with --owner-value)")
    p.add_argument("--value-seeds", type=positive_int, default=3,
                   help="model pairs (with and without each owner) per owner for --owner-value")
    p.add_argument("--subsets", type=positive_int, default=100, help="retrained models for LDS")
    p.add_argument("--owner-subsets", type=positive_int, default=100, help="retrained models for owner-level LDS")
    p.add_argument("--alpha", type=fraction, default=0.5, help="fraction of examples (owners) per subset")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the subsets and their training")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="ground-truth cache (default ~/.cache/fedtrak/groundtruth)")
    p.add_argument("--workers", type=positive_int, default=None, help="training processes (default: cores)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the seed-noise ceiling (it retrains every subset once more from other seeds)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--queries", type=positive_int, default=4, help="queries shown in the figures")


def _attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--kind", action="append", choices=ATTACK_KINDS,
                   help="attack to run (repeatable; default: every one that applies to the run's mode and task)")
    p.add_argument("--targets", type=positive_int, default=8, help="examples attacked")
    p.add_argument("--trials", type=positive_int, default=400, help="membership games")
    inversion_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def inversion_args(p: argparse.ArgumentParser) -> None:
    """The budget of a gradient-inversion attack."""
    p.add_argument("--steps", type=positive_int, default=300, help="optimization steps per inversion")
    p.add_argument("--restarts", type=positive_int, default=4, help="random starts per label tried")
    p.add_argument("--label-candidates", type=positive_int, default=2, help="labels tried per target")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, SWEEP_KEYS, defaults={"flip-fraction": 0.1})
    p.add_argument("--epsilons", default="0.5,1,2,4,8,inf",
                   help="comma-separated whole-run epsilons; inf: no noise")
    p.add_argument("--modes", default="private,features", help="comma-separated modes")
    p.add_argument("--kernel-sources", default="auto",
                   help="comma-separated kernel sources of the private-mode lines: auto, private, public, hybrid")
    p.add_argument("--secure-agg", default="default",
                   help="comma-separated secure aggregation choices of the private-mode lines: default (on "
                        "under DP wherever Grams are released), on, off")
    p.add_argument("--subsets", type=positive_int, default=100, help="retrained models per LDS")
    p.add_argument("--attack-targets", type=positive_int, default=8,
                   help="examples attacked at each point (feature inversion)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="ground-truth cache (default ~/.cache/fedtrak/groundtruth)")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs, table and plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the points' lines are still printed)")


def _audit_args(p: argparse.ArgumentParser) -> None:
    add_settings(p, ["task", "clip-norm", "proj-dim", "weighting", "clients", "delta", "seed"],
                 defaults={"proj-dim": DEFAULT_PROJ_DIM})
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma of the audited release")
    p.add_argument("--releases", type=positive_int, default=20, help="noised Grams (k canaries each)")
    p.add_argument("--release", choices=("gram", "owner"), default="gram",
                   help="gram: one client's Gram; owner: its suspect count and owner value (one number each, "
                        "through the client's own code, 4,000 trials)")
    add_json(p, "the result")


ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "evaluate": _evaluate_args, "report": _report_args, "attack": _attack_args, "sweep": _sweep_args,
    "audit": _audit_args}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``command``."""
    ARGUMENTS[command](parser)


def evaluate(args: argparse.Namespace) -> int:
    """LDS, owner-level LDS and mislabel detection of a run folder."""
    from fedtrak.results.summary import SUMMARY
    from fedtrak.simulations.evaluation.conclusion import conclusion, not_measured
    from fedtrak.simulations.evaluation.evaluate import EvalOptions, evaluate_run, format_table
    from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE
    from fedtrak.simulations.run_folder import RunFolder

    chosen = tuple(m for m, on in (("lds", args.lds), ("owner_lds", args.owner_lds),
                                   ("mislabel", args.mislabel), ("owner_value", args.owner_value)) if on)
    opts = EvalOptions(chosen, args.subsets, args.owner_subsets, args.alpha, args.eval_seed,
                       args.cache_dir or DEFAULT_CACHE, args.workers, progress=not args.quiet,
                       ceiling=not args.no_ceiling, value_seeds=args.value_seeds)
    run = RunFolder.open(args.run_dir)  # before the retraining: a folder that is no run fails at once
    block = evaluate_run(args.run_dir, opts)
    shown = {k: block[k] for k in (chosen or block)}
    print(format_table(shown))
    print(f"wrote the evaluation block of {args.run_dir / SUMMARY}")
    print(conclusion(shown, not_measured(run.summary.release_policy, list(shown), chosen, opts.ceiling)))
    return 0


def report(args: argparse.Namespace) -> int:
    """An HTML page with figures of a run."""
    from fedtrak.simulations.report.page import write_report

    print(f"wrote {write_report(args.run_dir, args.out, args.queries)}")
    return 0


def attack(args: argparse.Namespace) -> int:
    """The curious server's attacks on a simulation's releases."""
    from fedtrak.results.summary import SUMMARY
    from fedtrak.simulations.attacks.conclusion import attack_conclusion
    from fedtrak.simulations.attacks.inversion import InversionSettings
    from fedtrak.simulations.attacks.suite import attack_run, format_block

    block = attack_run(args.run_dir, tuple(args.kind) if args.kind else None, args.targets, args.trials,
                       InversionSettings(steps=args.steps, restarts=args.restarts,
                                         label_candidates=args.label_candidates), progress=not args.quiet)
    print(format_block(block))
    print(f"wrote the attacks block of {args.run_dir / SUMMARY}")
    print(attack_conclusion(block))
    return 0


def epsilons(text: str) -> list[float]:
    """Comma-separated epsilons (``inf``: no noise).

    Raises:
        FedtrakError: if one is not a number.
    """
    try:
        return [math.inf if e.strip().lower() == "inf" else float(e) for e in text.split(",")]
    except ValueError:
        raise FedtrakError(f"--epsilons must be comma-separated numbers or inf, got {text!r}") from None


def secure_agg_choices(text: str) -> list[bool | None]:
    """``default,on,off`` as the sweep's secure aggregation choices.

    Raises:
        FedtrakError: naming an unknown choice.
    """
    from fedtrak.simulations.sweep import SECURE_AGG_CHOICES

    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in SECURE_AGG_CHOICES]
    if bad or not words:
        raise FedtrakError(f"--secure-agg {text!r}: use a comma-separated list of {', '.join(SECURE_AGG_CHOICES)}")
    return [SECURE_AGG_CHOICES[w] for w in words]


def sweep(args: argparse.Namespace) -> int:
    """Attribution quality against epsilon, per mode."""
    from tqdm import tqdm

    from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE
    from fedtrak.simulations.evaluation.sweep_text import (
        closing,
        format_table,
        point_line,
        start_line,
    )
    from fedtrak.simulations.sweep import SweepConfig, run_sweep, variants

    cfg = SweepConfig(
        out=args.out, base=settings_from(args, SWEEP_KEYS), epsilons=epsilons(args.epsilons),
        modes=[m.strip() for m in args.modes.split(",")], subsets=args.subsets,
        kernel_sources=[k.strip() for k in args.kernel_sources.split(",")],
        secure_aggs=secure_agg_choices(args.secure_agg),
        attack_targets=args.attack_targets, cache_dir=args.cache_dir or DEFAULT_CACHE, progress=not args.quiet,
        on_point=lambda row, reused: tqdm.write(point_line(row, reused)))
    cfg.validate()
    print(start_line([v.label for v in variants(cfg.modes, cfg.kernel_sources, cfg.secure_aggs)], cfg.epsilons),
          flush=True)
    rows = run_sweep(cfg)
    print(format_table(rows))
    print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.md'} and {args.out / 'sweep.png'}")
    print(closing(rows))
    return 0


def audit(args: argparse.Namespace) -> int:
    """A canary audit of one client's Gram release, or of its owner releases."""
    from fedtrak.simulations.evaluation.audit import audit_gram, audit_owner_releases

    if not args.noise_multiplier > 0:
        raise FedtrakError(f"--noise-multiplier must be positive, got {args.noise_multiplier}")
    if args.release == "owner":
        res = audit_owner_releases(args.noise_multiplier, delta=args.delta, seed=args.seed)
        print(f"owner releases (sigma {args.noise_multiplier:g}, {res['trials']} trials); accounted epsilon of "
              f"one release at delta {res['delta']:g}: {res['accounted_epsilon_one_release']:.3f}")
        for name in ("suspect_count", "owner_value"):
            print(f"  {name}: empirical epsilon lower bound ({res['confidence']:.0%}) "
                  f"{res[name]['empirical_epsilon_lower_bound']:.3f}")
    else:
        res = _audit_gram(args, audit_gram)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


def _audit_gram(args: argparse.Namespace, audit_gram: Callable[..., dict]) -> dict:
    res = audit_gram(args.task, args.noise_multiplier, args.clip_norm, args.proj_dim, args.releases,
                     args.clients, args.delta, args.seed, args.weighting)
    print(f"Gram release of one client ({res['client_examples']} examples, k={res['proj_dim']}, sigma "
          f"{res['noise_multiplier']:g}, C {res['clip_norm']:g}): {res['canaries']} canaries over "
          f"{res['releases']} releases")
    print(f"  empirical epsilon lower bound ({res['confidence']:.0%}): {res['empirical_epsilon_lower_bound']:.3f}")
    print(f"  accounted epsilon of one release at delta {res['delta']:g}: "
          f"{res['accounted_epsilon_one_release']:.3f}")
    return res


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "evaluate": evaluate, "report": report, "attack": attack, "sweep": sweep, "audit": audit}
