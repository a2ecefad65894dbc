"""``fedtrak evaluate RUN_DIR``: how good are a run's attributions?

* ``lds``: linear datamodeling score of the example scores against models
  retrained on random ``alpha``-subsets of the training examples;
* ``owner_lds``: the same for owner totals and random subsets of owners;
* ``mislabel``: detection of flipped labels by self-influence (runs made
  with ``--flip-fraction``);
* ``owner_value``: owner values against each owner's removal effect (runs made
  with ``--owner-value``, :mod:`fedtrak.simulations.evaluation.owner_value`).

Ground truth is retrained with the run's own algorithm and cached
(:mod:`fedtrak.simulations.evaluation.groundtruth`). The results go into an ``evaluation``
block of the run's ``summary.json`` (earlier entries of other measures are
kept) and per-query LDS values into ``evaluation/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtrak.errors import FedtrakError
from fedtrak.logs import progress_bar
from fedtrak.simulations.evaluation.groundtruth import DEFAULT_CACHE, ground_truth
from fedtrak.simulations.evaluation.lds import lds, seed_ceiling
from fedtrak.simulations.evaluation.mislabel import mislabel_report
from fedtrak.simulations.evaluation.owner_value import DEFAULT_SEEDS, owner_value_entry
from fedtrak.simulations.run_folder import RunFolder

MEASURES = ("lds", "owner_lds", "mislabel", "owner_value")


@dataclass(frozen=True)
class EvalOptions:
    """Settings of one evaluation (the flags of ``fedtrak evaluate``).

    ``measures`` empty means every measure the run supports.
    """

    measures: tuple[str, ...] = ()
    subsets: int = 100
    owner_subsets: int = 100
    alpha: float = 0.5
    seed: int = 0
    cache_dir: Path = DEFAULT_CACHE
    workers: int | None = None
    bootstrap: int = 1000
    progress: bool = True
    ceiling: bool = True
    value_seeds: int = DEFAULT_SEEDS


def applicable(run: RunFolder) -> tuple[str, ...]:
    """The measures a run supports: LDS needs released scores, mislabel needs flips."""
    out = []
    if run.has("scores"):
        out.append("lds")
    out.append("owner_lds")
    if run.summary.flips:
        out.append("mislabel")
    if run.has("owner_value"):
        out.append("owner_value")
    return tuple(out)


def _lds_entry(run: RunFolder, opts: EvalOptions, kind: str, bar: Callable[[int], None]) -> dict:
    recipe = run.recipe()
    n = opts.subsets if kind == "examples" else opts.owner_subsets
    gt = ground_truth(recipe, kind, n, opts.alpha, opts.seed, opts.cache_dir, opts.workers, bar)
    if kind == "examples":
        why = "LDS (rerun with --policy full or --mode features, or use fedtrak attribute)"
        scores = np.asarray(run.array("scores", why))
        index = np.asarray(run.array("example_ids", why)["index"])
        res = lds(scores, gt.masks[:, index], gt.margins, opts.bootstrap, seed=opts.seed)
    else:
        owners = np.asarray(run.array("owner_scores", "owner-level LDS"))
        res = lds(owners, gt.owner_masks[:, run.owner_partition_ids()], gt.margins, opts.bootstrap,
                  seed=opts.seed)
    folder = run.path / "evaluation"
    folder.mkdir(exist_ok=True)
    np.save(folder / f"{'lds' if kind == 'examples' else 'owner_lds'}_per_query.npy", res.per_query)
    ceiling = {}
    if opts.ceiling:
        replica = ground_truth(recipe, kind, n, opts.alpha, opts.seed, opts.cache_dir, opts.workers, bar, replica=1)
        found = seed_ceiling(gt.margins, replica.margins)
        if res.mean > found["ceiling"]:  # measured on fmnist-mlp: replicas correlate 0.003, LDS 0.16
            found["note"] = ("LDS exceeds the estimate: the two retrainings hardly correlate (seed noise "
                             "dominates), and per-query sqrt(r) of near-zero r is no reliable bound")
        ceiling = {"ceiling": found,
                   "lds_over_ceiling": res.mean / found["ceiling"] if found["ceiling"] > 0 else None}
    return {**res.describe(), **ceiling, "alpha": opts.alpha, "seed": opts.seed,
            "ground_truth": {**recipe.origin(), "epochs": recipe.epochs, "rounds": recipe.rounds,
                             "cache": str(gt.folder), "models_reused": gt.reused,
                             "models_trained": gt.trained, "seconds": round(gt.seconds, 2)}}


def _mislabel_entry(run: RunFolder) -> dict:
    flips = run.summary.flips
    if not flips:
        raise FedtrakError(f"{run.path} flipped no labels: make the run with --flip-fraction to measure "
                           "mislabel detection")
    flipped = np.asarray(run.array("flipped", "mislabel detection"))
    per_example = np.asarray(run.array("self_influence", "")) if run.has("self_influence") else None
    index = np.asarray(run.array("example_ids", "")["index"]) if run.has("example_ids") else None
    per_owner = (np.asarray(run.array("owner_self_influence", "")) if run.has("owner_self_influence")
                 else None)
    report = mislabel_report(per_example, index, per_owner, run.owner_partition_ids(), flipped,
                             list(flips.clients))
    return {"flip_fraction": flips.fraction, "flip_clients": list(flips.clients), **report}


def evaluate_run(run_dir: Path, opts: EvalOptions) -> dict:
    """Evaluate a run folder and write the ``evaluation`` block into its summary; return the block.

    Raises:
        FedtrakError: if a requested measure needs something the run does
            not have (named in the message); nothing is written then, and the
            retrained models already cached are kept.
    """
    run = RunFolder.open(run_dir)
    measures = opts.measures or applicable(run)
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise FedtrakError(f"unknown measure(s) {sorted(unknown)}: use {', '.join(MEASURES)}")
    block = dict(run.summary.evaluation)
    total = (opts.subsets if "lds" in measures else 0) + (opts.owner_subsets if "owner_lds" in measures else 0)
    total *= 2 if opts.ceiling else 1
    if "owner_value" in measures:
        total += opts.value_seeds * (len(run.owner_partition_ids()) + 1)
    with progress_bar(opts.progress, total, "ground-truth models", unit="model") as bar:
        results = {}
        if "lds" in measures:
            results["lds"] = _lds_entry(run, opts, "examples", bar.update)
        if "owner_lds" in measures:
            results["owner_lds"] = _lds_entry(run, opts, "owners", bar.update)
        if "owner_value" in measures:
            results["owner_value"] = owner_value_entry(run, opts.value_seeds, opts.seed, opts.workers, bar.update)
    if "mislabel" in measures:
        results["mislabel"] = _mislabel_entry(run)
    block.update(results)
    run.write_evaluation(block)
    return block


#: The LDS measures of an evaluation block, by key, with their names in a person's words.
LDS_MEASURES = (("lds", "LDS"), ("owner_lds", "owner-level LDS"))


def headline(block: Mapping[str, Any]) -> str | None:
    """The evaluation's main numbers in a few words (LDS, with its ceiling where measured), or
    ``None`` for a block without LDS."""
    words = []
    for key, label in LDS_MEASURES:
        e = block.get(key)
        if e:
            ceiling = e.get("ceiling", {}).get("ceiling") if e.get("lds_over_ceiling") is not None else None
            words.append(f"{label} {e['lds']:.3f}" + ("" if ceiling is None else f" (ceiling {ceiling:.3f})"))
    return ", ".join(words) or None


def format_table(block: dict) -> str:
    """The evaluation block as a small text table."""
    rows = [("measure", "value", "95% interval / baseline", "based on")]
    for key, label in LDS_MEASURES:
        if key in block:
            e = block[key]
            rows.append((label, f"{e['lds']:.3f}", f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]",
                         f"{e['num_queries']} queries x {e['num_subsets']} models"))
            if e.get("lds_over_ceiling") is not None:
                rows.append((f"{label} ceiling", f"{e['ceiling']['ceiling']:.3f}",
                             f"LDS / ceiling {e['lds_over_ceiling']:.2f}", "seed noise of retraining"))
    if "owner_value" in block:
        e = block["owner_value"]
        rows.append(("owner value Spearman", f"{e['spearman']:.3f}", f"{e['groups']} group(s)",
                     f"{e['owners']} owners' removal, {e['seeds']} seed pairs"))
    for level in ("examples", "owners"):
        e = block.get("mislabel", {}).get(level)
        if e and "auroc" in e:
            rows.append((f"mislabel AUROC ({level})", f"{e['auroc']:.3f}", "random 0.500",
                         f"{e['num_flipped']} flipped of {e['num_items']}"))
            rows.append((f"mislabel recall ({level})", f"{e['recall_at_flip_rate']:.3f}",
                         f"random {e['random_recall']:.3f}", "top flip-rate fraction"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    notes = {e["ground_truth"]["note"] for e in block.values()
             if isinstance(e, dict) and isinstance(e.get("ground_truth"), dict) and "note" in e["ground_truth"]}
    return "\n".join(["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
                     + [f"ground truth: {n}" for n in sorted(notes)])
