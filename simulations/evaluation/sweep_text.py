"""The words of ``fedtrak sweep``: each point's line as it finishes, the table, and the closing
sentences (how much of its non-private LDS each line keeps, and why a public kernel's line is flat).

A row is one measured point, as :func:`fedtrak.simulations.sweep.run_sweep` returns it: its line
(``line``), ``mode``, the kernel it used (``kernel_source``), ``secure_aggregation``, ``epsilon``
(``inf``: no noise) and the measures (``lds``, ``owner_lds``, ``mislabel_auroc``, the attacks').
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: The share of its non-private LDS a line is checked to keep.
KEEP = 0.8


def eps_text(eps: float) -> str:
    """An epsilon as the sweep writes it (``inf``: no noise)."""
    return "inf" if math.isinf(eps) else f"{eps:g}"


def line_of(row: dict) -> str:
    """The name of the row's line (rows of old sweeps have only a mode)."""
    return row.get("line", row["mode"])


def row_name(row: dict) -> str:
    """The row's name in the table: its line, with the kernel and secure aggregation the point
    used where the line's name leaves them to the default rule (each said once)."""
    line = line_of(row)
    if row["mode"] != "private":
        return line
    extra = [] if "kernel" in line else [f"{row.get('kernel_source', 'private')} kernel"]
    if row.get("secure_aggregation") and "secagg" not in line:
        extra.append("secagg")
    return f"{line} ({', '.join(extra)})" if extra else line


def _attack_text(row: dict) -> str:
    """The reconstruction attack's cell: recovered share, PSNR (class mean); "not applicable" for token ids."""
    if math.isnan(row["attack_recovered"]):
        return "not applicable"
    return f"{row['attack_recovered']:.0%}, {row['attack_psnr']:.1f} ({row['attack_baseline_psnr']:.1f})"


def format_table(rows: list[dict]) -> str:
    """The sweep as a markdown table."""
    lines = [("| line (kernel) | epsilon | sigma | LDS | owner-level LDS | mislabel AUROC (examples / owners) | "
              "attack on an owner holding 1 example: recovered, PSNR dB (class mean) | "
              "membership: empirical epsilon |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {row_name(r)} | {eps_text(r['epsilon'])} | {r['sigma']:.3g} | {r['lds']:.3f} "
                     f"[{r['lds_ci_low']:.3f}, {r['lds_ci_high']:.3f}] | {r['owner_lds']:.3f} "
                     f"[{r['owner_lds_ci_low']:.3f}, {r['owner_lds_ci_high']:.3f}] | "
                     f"{r['mislabel_auroc']:.3f} / {r['mislabel_auroc_owners']:.3f} | "
                     f"{_attack_text(r)} | "
                     f"{r['membership_epsilon']:.2f} |")
    return "\n".join(lines)


def start_line(lines: Sequence[str], epsilons: Sequence[float]) -> str:
    """What the sweep is about to measure, said before its first point."""
    points = len(lines) * len(epsilons)
    return (f"sweep: {points} point{'s' if points != 1 else ''}, {len(lines)} line{'s' if len(lines) != 1 else ''} "
            f"({'; '.join(lines)}) at epsilon {_listed(epsilons)}; each point is a federated run, then evaluated "
            "and attacked, and printed here when done")


def point_line(row: dict, reused: bool = False) -> str:
    """One finished point in a line of text, as the sweep prints it when the point is done."""
    if math.isnan(row["attack_recovered"]):
        attack = ""
    elif row["mode"] == "features":
        attack = f", inversion rebuilt {row['attack_recovered']:.0%} of the attacked examples"
    else:
        attack = f", the example of an owner holding 1 {'rebuilt' if row['attack_recovered'] else 'not rebuilt'}"
    if attack:
        attack += f" (PSNR {row['attack_psnr']:.1f} dB)"
    membership = "" if math.isnan(row["membership_epsilon"]) else (
        f", membership epsilon >= {row['membership_epsilon']:.2f}")
    when = "measured before, reused" if reused else f"{row.get('point_seconds', row['seconds']):.0f} s"
    return (f"{row_name(row)}, epsilon {eps_text(row['epsilon'])}: LDS {row['lds']:.3f}, owner-level LDS "
            f"{row['owner_lds']:.3f}, mislabel AUROC {row['mislabel_auroc']:.3f}{attack}{membership} ({when})")


def keeps_fraction(rows: list[dict], line: str, fraction: float = KEEP) -> float | None:
    """The smallest epsilon at which ``line``'s LDS is at least ``fraction`` of its LDS at epsilon inf."""
    base = [r["lds"] for r in rows if line_of(r) == line and math.isinf(r["epsilon"])]
    if not base:
        return None
    good = [r["epsilon"] for r in rows if line_of(r) == line and not math.isinf(r["epsilon"])
            and r["lds"] >= fraction * base[0]]
    return min(good) if good else None


def _listed(values: Sequence[float]) -> str:
    texts = [eps_text(v) for v in values]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} and {texts[-1]}"


def keep_sentence(rows: list[dict], line: str, fraction: float = KEEP) -> str:
    """One sentence on how much of its non-private LDS (the line's point at epsilon inf) ``line``
    keeps at the epsilons measured, right for every case: no non-private point, none measured
    under noise, a non-positive reference, every point, none or some keeping ``fraction``."""
    mine = sorted((r for r in rows if line_of(r) == line), key=lambda r: r["epsilon"])
    base = [r["lds"] for r in mine if math.isinf(r["epsilon"])]
    noised = [r for r in mine if not math.isinf(r["epsilon"])]
    name = line[:1].upper() + line[1:]
    at = ", ".join(f"{r['lds']:.3f} at epsilon {eps_text(r['epsilon'])}" for r in noised)
    if not base:
        return (f"{name}: LDS {at}; without a point at epsilon inf there is no non-private LDS to compare "
                "with (add inf to --epsilons).")
    if not noised:
        return f"{name}: LDS {base[0]:.3f} without noise; no epsilon under noise was measured."
    if not base[0] > 0:
        return f"{name}: LDS {at}; its non-private LDS, {base[0]:.3f}, is not positive, so no share of it is kept."
    ref = f"{fraction:.0%} of its non-private value ({base[0]:.3f} at epsilon inf)"
    keep = [r["epsilon"] for r in noised if r["lds"] >= fraction * base[0]]
    measured = [r["epsilon"] for r in noised]
    if len(noised) == 1:
        verb = "keeps at least" if keep else "is below"
        return f"{name}: LDS {at} {verb} {ref}."
    if not keep:
        return f"{name}: LDS stays below {ref} at every epsilon measured: {at}."
    if len(keep) == len(noised):
        return f"{name}: LDS keeps at least {ref} at every epsilon measured: {at}."
    if [e for e in measured if e >= keep[0]] == keep:
        return f"{name}: LDS keeps {ref} from epsilon {eps_text(keep[0])} up, not below: {at}."
    return f"{name}: LDS keeps {ref} only at epsilon {_listed(keep)}: {at}."


def summary_line(rows: list[dict]) -> str:
    """The sweep's closing sentences: one per line on the share of its non-private LDS it keeps."""
    return "\n".join(keep_sentence(rows, line) for line in dict.fromkeys(line_of(r) for r in rows))


#: Why a public kernel's LDS stays the same at every epsilon.
PUBLIC_FLAT = ("A public kernel's LDS does not change with epsilon (its line is flat): the server builds that kernel from its own public data, so no "
               "budget is spent on a Gram and the kernel is the same at every epsilon (scaled to the noised "
               "example count, a scale that LDS, a rank correlation, does not see); what is noised is the "
               "count and the owner releases, so owner-level LDS does move.")
#: Why it is below the exact kernel's (said where the sweep measured both and it is).
PUBLIC_BELOW = ("It is below the exact kernel (the clients' Grams without noise, LDS {exact:.3f}) because a public "
                "sample only estimates the training data's second moment.")


def not_measured(rows: list[dict]) -> str:
    """The sentence naming what the sweep did not measure, each with its reason."""
    skipped = [("the seed-noise ceiling (a sweep retrains each subset once; fedtrak evaluate on a point's folder "
                "measures it)")]
    if all(math.isnan(r["mislabel_auroc"]) and math.isnan(r["mislabel_auroc_owners"]) for r in rows):
        skipped.append("mislabel detection (no labels were flipped: --flip-fraction 0)")
    if all(math.isnan(r["attack_recovered"]) for r in rows):
        skipped.append("the reconstruction attacks (they rebuild continuous inputs, which this task does not have)")
    if any(r["mode"] == "features" for r in rows):
        skipped.append("membership inference in features mode (it hides feature values, not their presence)")
    return f"Not measured: {'; '.join(skipped)}."


def closing(rows: list[dict]) -> str:
    """What the sweep found, in sentences: :func:`summary_line`, then, where a point used the public
    kernel, why its line is flat (:data:`PUBLIC_FLAT`) and, where it is, below the exact kernel's;
    last, what was not measured and why (:func:`not_measured`)."""
    words = [summary_line(rows)]
    public = [r["lds"] for r in rows if r["mode"] == "private" and r.get("kernel_source") == "public"]
    if public:
        words.append(PUBLIC_FLAT)
        exact = [r["lds"] for r in rows if r["mode"] == "private" and r.get("kernel_source") == "private"
                 and math.isinf(r["epsilon"])]
        if exact and max(public) < exact[0]:
            words[-1] += " " + PUBLIC_BELOW.format(exact=exact[0])
    return "\n".join([*words, not_measured(rows)])
