"""What ``fedtrak attack`` found, in plain sentences: how much a curious server rebuilt at the
run's epsilon, and each attack it did not run, with the reason.

The owner-size attack (``small_owner`` in the block) cuts client 0 down to its first N examples
and attacks what such an owner releases; its rows are named "an owner holding N examples".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import groupby
from typing import Any

from fedtrak.simulations.attacks.metrics import RECOGNIZABLE_PSNR

#: Each attack's name in a sentence, by its key in the attacks block.
NAMES = {"inversion": "Feature inversion", "small_owner": "The owner-size attack (rebuilding an owner's examples)",
         "membership": "Membership inference", "gram": "The attack on a client's Gram"}


def holding(n: int) -> str:
    """``an owner holding n example(s)``."""
    return f"an owner holding {n} example{'s' if n != 1 else ''}"


def _of_owner(recovered: float, n: int) -> str:
    """How many of the examples of an owner holding ``n`` a recovered share is, in words."""
    k = round(recovered * n)
    if k == 0:
        return f"none of the examples of {holding(n)}"
    if k == n:
        return f"the one example of {holding(1)}" if n == 1 else f"all of the examples of {holding(n)}"
    return f"{k} of the {n} examples of an owner holding {n}"


def _sizes_phrase(rows: Sequence[Mapping[str, Any]]) -> str:
    """The owner-size rows in words, runs of sizes rebuilt wholly (or not at all) said together."""
    parts = []
    for kind, group in groupby(rows, key=lambda r: r["recovered"] if r["recovered"] in (0.0, 1.0) else None):
        run = list(group)
        if kind is None or len(run) == 1:
            parts += [_of_owner(r["recovered"], r["client_examples"]) for r in run]
        else:
            sizes = [str(r["client_examples"]) for r in run]
            parts.append(f"{'all' if kind == 1.0 else 'none'} of the examples of owners holding "
                         f"{', '.join(sizes[:-1])} or {sizes[-1]}")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def attack_conclusion(block: Mapping[str, Any]) -> str:
    """The attacks block's conclusion: one sentence of what a curious server rebuilt at the run's
    epsilon and how well membership inference did, then one per attack skipped, with its reason."""
    eps = block.get("run_epsilon")
    found = []
    inv = block.get("inversion") or {}
    if "recovered" in inv:
        k = round(inv["recovered"] * inv["examples"])
        found.append(f"a curious server rebuilt {k} of the {inv['examples']} attacked examples from their released "
                     f"features (PSNR {inv['psnr_mean']:.0f} dB, where a guess of each class's mean image scores "
                     f"{inv['baseline']['psnr_mean']:.0f} dB)")
    owner = block.get("small_owner") or {}
    if owner.get("sizes"):
        first = owner["sizes"][0]
        found.append(f"a curious server reading an owner's releases (its {owner['release']}) rebuilt "
                     f"{_sizes_phrase(owner['sizes'])} (PSNR {first['psnr_mean']:.0f} dB for "
                     f"{holding(first['client_examples'])}, where a guess of each class's mean image scores "
                     f"{first['baseline']['psnr_mean']:.0f} dB)")
    mem = block.get("membership") or {}
    if "tpr" in mem:
        found.append(f"membership inference, telling the owner's examples from others, reached a true-positive "
                     f"rate of {mem['tpr']:g} at a false-positive rate of {mem['fpr']:g} (empirical epsilon >= "
                     f"{mem['empirical_epsilon_lower_bound']:g})")
    lines = []
    if found:
        rebuilt = "" if not (inv.get("examples") or owner.get("sizes")) else (
            f" An example counts as rebuilt where it is recognizable (PSNR >= {RECOGNIZABLE_PSNR:g} dB).")
        lines.append(f"{'Without noise' if eps is None else f'At epsilon {eps:g}'} {'; '.join(found)}.{rebuilt}")
    lines += [f"{NAMES[key]} was not run: {block[key]['skipped']}." for key in NAMES
              if isinstance(block.get(key), Mapping) and "skipped" in block[key]]
    return "\n".join(lines)
