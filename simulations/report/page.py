"""``fedtrak report RUN_DIR``: one self-contained HTML page about a run.

The page holds PNG figures (embedded as ``data:`` URIs, and also written
beside it under ``report/``, each named by its content: ``proponents.png``, ``owners.png``,
``lds.png``, ``mislabel.png``, ``attacks.png``) and tables, with no external script, style sheet or font, so it
opens in a browser without network access:

* for a few queries, the query image beside its top proponents and
  opponents (only where the run released example scores and the examples
  are the task's own, as in simulation);
* owner-level attribution: each owner's total for those queries, and its
  mean total over all queries;
* LDS and owner-level LDS with their intervals and the per-query spread
  (after ``fedtrak evaluate``);
* mislabel detection: self-influence of flipped against clean examples and
  owners (runs with label flips);
* the run's settings and the evaluation table.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.results.summary import RunSummary
from fedtrak.simulations.attacks.conclusion import holding
from fedtrak.simulations.attacks.figure import strip_figure
from fedtrak.simulations.attacks.metrics import RECOGNIZABLE_PSNR
from fedtrak.simulations.report.tables import (
    TOP,
    image_shape_of,
    label_text,
    proponent_table,
    text_table,
)
from fedtrak.simulations.run_folder import RunFolder


def _run_task(run: RunFolder) -> Task | None:
    """The run's task with its training labels as the run saw them, or ``None`` if it cannot be loaded."""
    try:
        return run.task_and_partition()[0]
    except FedtrakError:
        return None


def pick_queries(num_queries: int, count: int) -> np.ndarray:
    """``count`` query indices spread evenly over the query set."""
    return np.unique(np.linspace(0, num_queries - 1, min(count, num_queries)).round().astype(int))


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def proponent_figure(run: RunFolder, task: Task, queries: np.ndarray) -> bytes | None:
    """Query images beside their top proponents and opponents (``None`` without scores or images)."""
    shape = image_shape_of(task)
    if shape is None or not run.has("scores") or not run.has("example_ids"):
        return None
    scores = run.array("scores", "the proponent figure")
    index = np.asarray(run.array("example_ids", "the proponent figure")["index"])
    fig, axes = plt.subplots(len(queries), 2 * TOP + 1, figsize=(1.3 * (2 * TOP + 1), 1.55 * len(queries)),
                             squeeze=False)
    for row, q in enumerate(queries):
        s = np.asarray(scores[q], dtype=np.float64)
        order = np.argsort(-s, kind="stable")
        panels = [("query", task.x_query[q], f"query {q}\nlabel {task.y_query[q]}", "black")]
        panels += [("pro", task.x_train[index[j]], f"+{s[j]:.2g}\nlabel {task.y_train[index[j]]}", "tab:green")
                   for j in order[:TOP]]
        panels += [("opp", task.x_train[index[j]], f"{s[j]:.2g}\nlabel {task.y_train[index[j]]}", "tab:red")
                   for j in order[::-1][:TOP]]
        for ax, (_, x, title, color) in zip(axes[row], panels):
            ax.imshow(np.asarray(x, dtype=np.float32).reshape(shape), cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
    fig.suptitle(f"each query, its top {TOP} proponents (green) and top {TOP} opponents (red); "
                 "titles: score, training label", fontsize=9)
    return _png(fig)


def owner_figure(run: RunFolder, queries: np.ndarray, task: Task | None = None) -> bytes:
    """Owner totals for the chosen queries (each under its query: the image, or its label; the
    server owns the queries), and each owner's mean total over all queries."""
    owners = np.asarray(run.array("owner_scores", "the owner figure"), dtype=np.float64)
    names = [o.owner for o in run.summary.owners] or [str(c) for c in range(owners.shape[1])]
    cols = len(queries) + 1
    shape = None if task is None else image_shape_of(task)
    fig, grid = plt.subplots(2 if shape else 1, cols, figsize=(3.0 * cols, 5.0 if shape else 2.8), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.6]} if shape else None)
    axes = grid[-1:]
    if shape:
        for ax, q in zip(grid[0], queries):
            ax.imshow(np.asarray(task.x_query[q], dtype=np.float32).reshape(shape), cmap="gray_r")
            ax.set_axis_off()
        grid[0][-1].set_axis_off()
    pos = np.arange(owners.shape[1])
    for ax, q in zip(axes[0], queries):
        vals = owners[q]
        ax.bar(pos, vals, color=np.where(vals >= 0, "tab:green", "tab:red"))
        label = "" if task is None or q >= len(task.y_query) else f", label {label_text(task.y_query[q])}"
        ax.set_title(f"query {q}{label}", fontsize=9)
    mean = owners.mean(axis=0)
    ax = axes[0][-1]
    ax.bar(pos, mean, color="tab:blue")
    ax.set_title(f"mean over all {owners.shape[0]} queries", fontsize=9)
    for ax in axes[0]:
        ax.set_xticks(pos)
        ax.set_xticklabels(names, fontsize=7, rotation=90 if len(names) > 12 else 0)
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xlabel("owner", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("owner total (sum of scores)", fontsize=8)
    return _png(fig)


def lds_figure(run: RunFolder) -> bytes | None:
    """LDS with its interval, and the per-query distribution (``None`` before evaluation)."""
    ev = run.summary.evaluation
    entries = [(k, label) for k, label in (("lds", "LDS (examples)"), ("owner_lds", "LDS (owners)")) if k in ev]
    if not entries:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
    for i, (key, label) in enumerate(entries):
        e = ev[key]
        left.errorbar([i], [e["lds"]], yerr=[[e["lds"] - e["ci_low"]], [e["ci_high"] - e["lds"]]],
                      fmt="o", capsize=6, color="tab:blue")
        left.annotate(f"{e['lds']:.3f}\n[{e['ci_low']:.3f}, {e['ci_high']:.3f}]", (i, e["lds"]),
                      textcoords="offset points", xytext=(12, -10), fontsize=7)
        per_query = run.path / "evaluation" / f"{key}_per_query.npy"
        if per_query.is_file():
            vals = np.load(per_query)
            right.hist(vals[np.isfinite(vals)], bins=30, alpha=0.6, label=label)
    left.set_xticks(range(len(entries)))
    left.set_xticklabels([label for _, label in entries], fontsize=8)
    left.set_xlim(-0.5, len(entries) - 0.3)
    left.axhline(0, color="gray", lw=0.6)
    left.set_ylabel("Spearman, mean over queries", fontsize=8)
    left.set_title("LDS with 95% bootstrap interval", fontsize=9)
    right.set_title("per-query rank correlation", fontsize=9)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    return _png(fig)


def mislabel_figure(run: RunFolder) -> bytes | None:
    """Self-influence of flipped against clean examples, and owner means (runs with flips)."""
    flips = run.summary.flips
    if not flips or not run.has("flipped"):
        return None
    flipped = np.asarray(run.array("flipped", "the mislabel figure"))
    panels = []
    if run.has("self_influence") and run.has("example_ids"):
        panels.append("examples")
    if run.has("owner_self_influence"):
        panels.append("owners")
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "examples":
            si = np.asarray(run.array("self_influence", ""))
            bad = np.isin(np.asarray(run.array("example_ids", "")["index"]), flipped)
            bins = np.linspace(si.min(), si.max(), 40)
            ax.hist(si[~bad], bins=bins, alpha=0.6, label=f"clean ({(~bad).sum()})", color="tab:blue")
            ax.hist(si[bad], bins=bins, alpha=0.7, label=f"flipped ({bad.sum()})", color="tab:red")
            ax.set_yscale("log")
            ax.set_title("self-influence per example", fontsize=9)
            ax.set_xlabel("self-influence", fontsize=8)
            ax.set_ylabel("examples (log scale)", fontsize=8)
            ax.legend(fontsize=7)
        else:
            own = np.asarray(run.array("owner_self_influence", ""))
            flip_clients = set(flips.clients)
            bad = np.array([pid in flip_clients for pid in run.owner_partition_ids()])
            ax.bar(np.arange(len(own)), own, color=np.where(bad, "tab:red", "tab:blue"))
            ax.set_xticks(np.arange(len(own)))
            ax.set_title("mean self-influence per owner (red: flipped labels)", fontsize=9)
            ax.set_xlabel("owner", fontsize=8)
        ax.tick_params(labelsize=7)
    return _png(fig)


def attack_figure(run: RunFolder) -> bytes | None:
    """Each attack's true examples above what the server rebuilt from the releases (``None``
    before ``fedtrak attack`` or for an attack with no images)."""
    file = run.path / "attacks.npz"
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise FedtrakError(f"cannot read {file}: {exc}") from exc
    strips = [(name.replace("_", " "), arrays[f"{name}_true"], arrays[f"{name}_rec"])
              for name in ("inversion", "small_owner") if f"{name}_true" in arrays]
    if not strips:
        return None
    return strip_figure(strips, tuple(int(v) for v in arrays["input_shape"]),
                        "true examples of client 0 (upper row of each pair) and the server's reconstructions")


def _attack_rows(block: dict) -> list[tuple[str, str]]:
    if not block:
        return []
    eps = block.get("run_epsilon") or block.get("accounted_epsilon")
    rows = [("attacked releases", (f"{block['mode']} mode, {block['projector']} k = {block['proj_dim']}, "
                                   f"epsilon {'none (no noise)' if eps is None else f'{eps:.3g}'}"
                                   + (", secure aggregation" if block.get("secure_aggregation") else "")))]
    inv = block.get("inversion", {})
    if "psnr_mean" in inv:
        rows.append(("feature inversion", (f"PSNR {inv['psnr_mean']} dB, SSIM {inv['ssim_mean']}, recovered "
                                           f"{inv['recovered']:.0%} of {inv['examples']} (class mean: PSNR "
                                           f"{inv['baseline']['psnr_mean']} dB, recovered "
                                           f"{inv['baseline']['recovered']:.0%})")))
    for r in block.get("small_owner", {}).get("sizes", []):
        rows.append((f"{holding(r['client_examples'])} ({block['small_owner']['release']})",
                     (f"PSNR {r['psnr_mean']} dB, recovered {r['recovered']:.0%} (class mean "
                      f"{r['baseline']['psnr_mean']} dB, {r['baseline']['recovered']:.0%})")))
    mem = block.get("membership", {})
    if "tpr" in mem:
        rows.append(("membership inference", (f"TPR {mem['tpr']}, FPR {mem['fpr']} over {mem['trials']} trials; "
                                              f"empirical epsilon >= {mem['empirical_epsilon_lower_bound']} "
                                              f"(accounted {mem['accounted_epsilon'] or 'unbounded: no noise'})")))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _run_rows(summary: RunSummary) -> list[tuple[str, str]]:
    shape = summary.describe()
    rows = [("task", summary.task),
            ("mode", f"{summary.mode} (release: {summary.release_policy})"),
            ("training examples x queries", f"{summary.num_train} x {summary.num_queries}"),
            ("checkpoints (M)", f"{summary.num_checkpoints}"),
            ("projection", f"{summary.projector}, k = {summary.proj_dim}"),
            ("lambda per checkpoint", ", ".join(f"{v:.4g}" for v in summary.lambdas)),
            ("ensembling", f"{shape['ensemble']}; normalization {shape['normalization']}"),
            ("score sign", shape["score_sign"]),
            ("seconds", f"{summary.total_seconds:.1f}")]
    if summary.owners:
        rows.append(("owners", ", ".join(f"{o.owner} ({o.num_examples})" for o in summary.owners)))
    if summary.flips:
        f = summary.flips
        rows.append(("label flips", f"{f.num_flipped} examples ({f.fraction:.0%} of clients {list(f.clients)})"))
    if summary.warning:
        rows.append(("warning", summary.warning))
    return rows


def _evaluation_rows(ev: dict) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("lds", "LDS (examples)"), ("owner_lds", "LDS (owners)")):
        if key in ev:
            e = ev[key]
            rows.append((label, (f"{e['lds']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] over "
                                f"{e['num_queries']} queries x {e['num_subsets']} models retrained with "
                                f"{e['ground_truth']['algorithm']} on {e['alpha']:.0%} subsets")))
    for level in ("examples", "owners"):
        e = ev.get("mislabel", {}).get(level)
        if e and "auroc" in e:
            rows.append((f"mislabel detection ({level})",
                         (f"AUROC {e['auroc']:.3f} (random 0.5); recall at the flip rate "
                         f"{e['recall_at_flip_rate']:.3f} (random {e['random_recall']:.3f})")))
    return rows


STYLE = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:left;font-size:14px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}
p.note{color:#666;font-size:13px}tr.query td{background:#eef2fb;font-weight:bold}
tr.proponent td:first-child{color:#2a7a2a}tr.opponent td:first-child{color:#b02020}"""


def write_report(run_dir: Path, out: Path | None = None, num_queries: int = 4) -> Path:
    """Write ``report.html`` (and the PNGs under ``report/``) for a run; return the HTML file.

    Raises:
        FedtrakError: if the folder is not a complete run.
    """
    run = RunFolder.open(run_dir)
    out = Path(out) if out else run.path / "report.html"
    figures_dir = out.parent / "report"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for numbered in figures_dir.glob("figure-[0-9].png"):  # the names before figures were named by content
        numbered.unlink()
    owners = np.asarray(run.array("owner_scores", "a report"))
    queries = pick_queries(owners.shape[0], num_queries)
    task = _run_task(run)
    table = (text_table(run, task, queries) or proponent_table(run, task, queries)) if task else None
    # (title, figure (or a table's HTML) or None, caption, why it may be missing, the figure's file name)
    sections: list[tuple[str, bytes | str | None, str, str, str]] = [
        ("Top proponents and opponents", (proponent_figure(run, task, queries) or table) if task else None,
         "The training examples with the highest and lowest scores for each query.",
         ("Shown only where the run released example scores and the examples are the task's own "
          "(a simulation or the centralized path); a deployed run's examples never leave their devices."),
         "proponents.png"),
        ("Owner-level attribution", owner_figure(run, queries, task),
         ("Each owner's total score for a query: the sum of its examples' scores (positive: the owner's "
          "data raises the query's margin)."), "", "owners.png"),
        ("LDS", lds_figure(run),
         ("Linear datamodeling score: per query, the rank correlation between the summed scores of a "
          "random subset and the margin of a model retrained on it."),
         "Run fedtrak evaluate on this folder to measure it.", "lds.png"),
        ("Mislabel detection", mislabel_figure(run),
         "Self-influence (each example's score for itself) of flipped against clean labels.",
         "Only for runs made with label flips (--flip-fraction).", "mislabel.png"),
        ("What can the server see?", attack_figure(run),
         (f"Reconstructions by a curious server from this run's releases (recognizable: PSNR >= "
          f"{RECOGNIZABLE_PSNR:g} dB); numbers in the table above."),
         "Run fedtrak attack on this folder to measure it.", "attacks.png"),
    ]
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedtrak report: "
             f"{html.escape(run.path.name)}</title><style>{STYLE}</style></head><body>"),
             f"<h1>fedtrak run {html.escape(run.path.name)}</h1>", _table(_run_rows(run.summary))]
    ev_rows = _evaluation_rows(run.summary.evaluation)
    parts.append("<h2>Evaluation</h2>" + (_table(ev_rows) if ev_rows else
                                           "<p class='note'>Not evaluated yet: fedtrak evaluate RUN_DIR.</p>"))
    attack_rows = _attack_rows(run.summary.attacks)
    if attack_rows:
        parts.append("<h2>Attacks</h2>" + _table(attack_rows))
    for title, png, caption, missing, name in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png is None:
            (figures_dir / name).unlink(missing_ok=True)
            parts.append(f"<p class='note'>Not available for this run. {html.escape(missing)}</p>")
            continue
        if isinstance(png, str):  # a table, for examples that are not images
            (figures_dir / name).unlink(missing_ok=True)
            parts.append(f"{png}<p class='note'>{html.escape(caption)}</p>")
            continue
        (figures_dir / name).write_bytes(png)
        data = base64.b64encode(png).decode()
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                     f"<p class='note'>{html.escape(caption)} (also report/{name})</p>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out
