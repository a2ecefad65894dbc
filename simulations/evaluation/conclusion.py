"""What ``fedtrak evaluate`` found, in plain sentences: what each measure says (named as
docs/evaluation.md names them), and each measure it did not take, with the reason.

:func:`not_measured` gives the reasons; :func:`conclusion` turns an evaluation
block (as :func:`fedtrak.simulations.evaluation.evaluate.evaluate_run` returns it) and those
reasons into the lines the command ends with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Each measure's name in a sentence.
NAMES = {"lds": "Per-example LDS", "owner_lds": "Owner-level LDS", "mislabel": "Mislabel detection",
         "owner_value": "Owner value", "ceiling": "The seed-noise ceiling"}


def not_measured(policy: str, measured: Sequence[str], asked: Sequence[str] = (),
                 ceiling: bool = True) -> dict[str, str]:
    """The measures left out of an evaluation of a run whose release policy is ``policy``, each
    with its reason. ``measured``: the measures taken; ``asked``: those named on the command line
    (empty: every one that applies, so the others are left out because the run does not support
    them); ``ceiling``: whether the seed-noise ceiling was measured beside LDS."""
    reasons: dict[str, str] = {}
    if not asked:
        if "lds" not in measured:
            reasons["lds"] = (f"this run kept example scores on the devices (policy {policy}; "
                              "fedtrak simulate --policy full releases them for evaluation)")
        if "mislabel" not in measured:
            reasons["mislabel"] = "this run flipped no labels (make it with --flip-fraction)"
        if "owner_value" not in measured:
            reasons["owner_value"] = "this run released no owner values (make it with --owner-value)"
    if not ceiling and {"lds", "owner_lds"} & set(measured):
        reasons["ceiling"] = "--no-ceiling skipped it (it retrains every subset once more)"
    return reasons


def _lds_finding(key: str, e: Mapping[str, Any]) -> str:
    """An LDS entry's number, with its ceiling where measured."""
    words = f"{'per-example LDS' if key == 'lds' else NAMES[key]} {e['lds']:.2f}"
    ceiling, ratio = (e.get("ceiling") or {}).get("ceiling"), e.get("lds_over_ceiling")
    if ceiling is None or ratio is None:
        return words
    if ratio > 1:
        return f"{words} (above its ceiling estimate {ceiling:.2f}, which is then no bound: seed noise dominates)"
    return f"{words} ({ratio:.0%} of its ceiling {ceiling:.2f})"


#: What LDS means, by the measures taken ({part}: the subsets' fraction in words, of the examples or owners).
LDS_MEANS = {
    ("lds",): "LDS is how well the summed scores of {part} of the examples rank a query's margin",
    ("owner_lds",): "Owner-level LDS is how well the summed totals of {part} of the owners rank a query's margin",
    ("lds", "owner_lds"): ("LDS (owner-level LDS) is how well the summed scores of {part} of the examples "
                           "(of the owners) rank a query's margin")}
LDS_MEANS_END = (" across models retrained on that {whole}: a rank correlation averaged over queries, 1 perfect, "
                 "0 chance.")


def _subset_words(alpha: float | None) -> tuple[str, str]:
    """The subsets of LDS in words: ("a random half", "half") at alpha 0.5, else ("a random 30%", "subset")."""
    if alpha is None or abs(alpha - 0.5) < 1e-9:
        return "a random half", "half"
    return f"a random {alpha:.0%}", "subset"
#: What the seed-noise ceiling means.
CEILING_MEANS = ("The ceiling is how far two retrainings of the same subsets from other seeds agree: seed noise "
                 "keeps any attribution below it.")


def conclusion(block: Mapping[str, Any], skipped: Mapping[str, str]) -> str:
    """The evaluation's conclusion: one sentence of what ``block`` found, what its LDS and ceiling
    mean, then one sentence naming each measure in ``skipped`` (from :func:`not_measured`) with its
    reason."""
    found = [_lds_finding(key, block[key]) for key in ("owner_lds", "lds") if key in block]
    mis = block.get("mislabel", {})
    aurocs = [f"AUROC {mis[level]['auroc']:.2f} per {level[:-1]}" for level in ("examples", "owners")
              if "auroc" in mis.get(level, {})]
    if aurocs:
        found.append(f"flipped labels found by self-influence with {' and '.join(aurocs)} (0.5 is chance)")
    if "owner_value" in block:
        found.append(f"owner values ordered like each owner's removal effect with Spearman "
                     f"{block['owner_value']['spearman']:.2f}")
    lines = []
    if found:
        first = "; ".join(found)
        lines.append(first[:1].upper() + first[1:] + ".")
    taken = tuple(key for key in ("lds", "owner_lds") if key in block)
    if taken:
        ceilings = any(block[key].get("lds_over_ceiling") is not None for key in taken)
        part, whole = _subset_words(block[taken[0]].get("alpha"))
        lines.append(LDS_MEANS[taken].format(part=part) + LDS_MEANS_END.format(whole=whole)
                     + (" " + CEILING_MEANS if ceilings else ""))
    lines += [f"{NAMES[key]} was not measured: {why}." for key, why in skipped.items()]
    return "\n".join(lines)
