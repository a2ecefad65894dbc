"""What a device's owner can see before and after a run, without contacting anyone.

``fedtrak device check --task T --data PATH`` loads the device's data file
(validated as a SuperNode would), featurizes one batch under an untrained
model of the task, and lists what the device would send in a run with the
given settings: every release, its shape and bytes, the clip norm and
whether noise is added. ``fedtrak device results DIR`` prints what a
``topk`` run kept on the device for its owner (never released): top
proponents and opponents per query and the most self-influential examples,
with the PNG strip of the examples for image tasks.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from fedtrak.client.data import DataFileError, read_device_data
from fedtrak.config.settings import Settings, releases_gram
from fedtrak.data.checkpoints import seeded_model
from fedtrak.data.modelout import IGNORE
from fedtrak.data.tasks import Task, load_task
from fedtrak.errors import FedtrakError
from fedtrak.privacy.kinds import COUNT, GRAM, KINDS, SUMMARY, planned_counts
from fedtrak.privacy.plan import kernel_weight_bound
from fedtrak.trak.per_checkpoint import checkpoint_featurizer
from fedtrak.trak.projectors import resolve_projection
from fedtrak.wire.records import FEATURIZE, SCORE

log = logging.getLogger("fedtrak.client")

#: Bytes of one released number (float64 arrays, uint64 masked vectors).
NUMBER_BYTES = 8


def _release_rows(checkpoints: int, k: int, queries: int, examples: int, noised: bool, secure_agg: bool,
                  policy: str, kernel_source: str, weight: float) -> list[dict]:
    """The rows of :func:`device_report`: one per kind of release the run's plan makes
    (:func:`fedtrak.privacy.kinds.planned_counts`), its noise in the kind's own words
    (:data:`fedtrak.privacy.kinds.KINDS`), its shape and bytes."""
    counts = planned_counts("private", checkpoints, False, False, gram_released=releases_gram(kernel_source))
    gram = k * (k + 1) // 2
    kernel = "curvature-weighted Gram" if weight != 1 else "Gram"
    rows = {
        GRAM: ("masked vector: Gram upper triangles of every checkpoint and the count (only their sum is revealed)"
               if secure_agg else f"{kernel} upper triangle per checkpoint",
               [checkpoints * gram + 1] if secure_agg else [checkpoints, gram], FEATURIZE),
        COUNT: ("example count", [1], FEATURIZE),
        SUMMARY: ("owner summaries (the server derives owner totals)", [checkpoints, k], SCORE) if noised
        else ("owner total per query", [queries], SCORE),
    }
    out = []
    for name, count in counts.items():
        if not count or name not in rows:
            continue
        what, shape, step = rows[name]
        noise = KINDS[name].noise + (f" (w = {weight:g})" if name == GRAM else "")
        out.append({"step": step, "what": what, "shape": shape, "bytes": NUMBER_BYTES * math.prod(shape),
                    "noise": ("Skellam share" if name == GRAM and secure_agg else noise) if noised else "none"})
    if kernel_source == "auto" and counts[GRAM]:  # the server decides: under DP with public data, none
        out[0]["what"] += " (none if the server's kernel is public)"
    if policy == "full":
        out.append({"step": SCORE, "what": "full score matrix (simulation and evaluation only)",
                    "shape": [queries, examples], "bytes": NUMBER_BYTES * queries * examples, "noise": "none"})
    return out


def _labels(task: Task, y: np.ndarray) -> list[int] | str:
    """The labels a device holds, as its owner reads them: the classes present, or what a language
    model's token labels are."""
    if task.class_labels:
        return sorted(int(v) for v in np.unique(y))
    if task.output.classes:
        return f"token ids per position ({int((y[:, 1:] != IGNORE).sum()):,} predicted tokens)"
    return f"real values in [{float(np.min(y)):.3g}, {float(np.max(y)):.3g}]"


def load_app(app: Path) -> dict:
    """Import a Flower app's ClientApp module from the app's folder, as a SuperNode running the app
    does, so that the tasks it registers (``fedtrak.register_task``) load by name here; return its run
    config (``[tool.flwr.app.config]``: its ``task`` and settings by run-config key).

    Raises:
        FedtrakError: if the folder has no Flower app's ``pyproject.toml`` or its ClientApp module
            cannot be imported.
    """
    app = Path(app).expanduser().resolve()
    try:
        flwr = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
        module = str(flwr["components"]["clientapp"]).partition(":")[0]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise FedtrakError(f"--app {app} is not a Flower app: its pyproject.toml lacks "
                           f"[tool.flwr.app.components] clientapp ({type(exc).__name__}: {exc})") from None
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    try:
        importlib.import_module(module)
    except Exception as exc:  # the user's code: named, not a traceback
        raise FedtrakError(f"--app {app}: cannot import its ClientApp module {module!r}: "
                           f"{type(exc).__name__}: {exc}") from exc
    return dict(flwr.get("config", {}))


def task_queries(task: Task) -> int:
    """How many queries the server scores by default for ``task``: its query set's size (a built-in
    task's data sets are read for it, where this device has them).

    Raises:
        FedtrakError: naming ``--queries`` if the task's query set is not on this device.
    """
    if task.has_data:
        return len(task.y_query)
    try:
        return len(load_task(task.name).y_query)
    except (FedtrakError, OSError) as exc:
        raise FedtrakError(f"task {task.name}'s query set is not on this device ({exc}): give --queries, the "
                           "number of queries the server will score") from None


def device_report(task_name: str, data_path: Path, proj_dim: int | None = None, projector: str = "rademacher",
                  checkpoints: int = 3, queries: int | None = None, noise_multiplier: float = 0.0,
                  clip_norm: float | None = None, secure_agg: bool = False, policy: str = "owner-totals",
                  batch_size: int = 256, weighting: str = "curvature", kernel_source: str = "auto") -> dict:
    """What this device would compute and send in a run with these settings.

    Raises:
        FedtrakError: on a bad task, data file or projection setting.
    """
    task = load_task(task_name, data=False)
    try:
        x, y = read_device_data(Path(data_path), task)
    except DataFileError as exc:  # the owner's own command: the path helps, and goes nowhere else
        raise FedtrakError(exc.local) from None
    settings = Settings().replaced(proj_dim=proj_dim, projector=projector, batch_size=batch_size, weighting=weighting)
    model = seeded_model(task, 0)
    projection = resolve_projection(settings.projection, model, task.num_params)  # as the server's preflight does
    featurizer = checkpoint_featurizer(task, model.state_dict(), 0, settings, projection)
    batch = min(batch_size, len(y))
    start = time.perf_counter()
    chunk = next(featurizer.iter_chunks(x[:batch], y[:batch]))
    seconds = time.perf_counter() - start
    noised = noise_multiplier > 0
    clip = clip_norm or task.clip_norm
    nq = task_queries(task) if queries is None else queries
    weight = kernel_weight_bound(settings.kernel.weighted, task)
    releases = _release_rows(checkpoints, projection.dim, nq, len(y), noised, secure_agg, policy, kernel_source, weight)
    kept = ["features of every example, per checkpoint (the local store)"]
    if policy == "topk":
        kept.append("top proponents and opponents per query (results/topk.npz), never released")
    return {"task": task.name, "data": str(data_path), "examples": len(y), "input_shape": list(x.shape[1:]),
            "labels": _labels(task, y), "num_params": featurizer.grad_dim,
            "projector": projection.kind, "proj_dim": projection.dim, "checkpoints": checkpoints, "queries": nq,
            "batch": {"examples": batch, "seconds": round(seconds, 3),
                      "feature_norm_median": float(np.median(np.linalg.norm(chunk.features, axis=1))),
                      "finite": bool(np.all(np.isfinite(chunk.features)))},
            "estimated_featurize_seconds": round(seconds / batch * len(y) * checkpoints, 1),
            "clip_norm": clip if noised else None, "noise": noised, "noise_multiplier": noise_multiplier,
            "secure_aggregation": secure_agg, "releases": releases,
            "bytes_sent_total": sum(r["bytes"] for r in releases), "kept_on_device": kept}


def format_report(report: dict) -> str:
    """The device check as text for its owner."""
    lines = [(f"task {report['task']}: {report['examples']} examples of shape {report['input_shape']}, labels "
             f"{report['labels']}, model of {report['num_params']:,} parameters"),
             (f"one batch of {report['batch']['examples']} featurized in {report['batch']['seconds']} s "
             f"(k = {report['proj_dim']}, {report['projector']}; median feature norm "
             f"{report['batch']['feature_norm_median']:.3g}); all {report['checkpoints']} checkpoints: about "
             f"{report['estimated_featurize_seconds']} s"),
             "noise: " + (f"on (sigma {report['noise_multiplier']:g}, clip norm {report['clip_norm']:g})"
                          if report["noise"] else "off: releases are exact"),
             "secure aggregation: " + ("on" if report["secure_aggregation"] else "off"),
             "this device would send:"]
    for r in report["releases"]:
        lines.append(f"  {r['step']}: {r['what']}: shape {r['shape']}, {r['bytes']:,} bytes, noise {r['noise']}")
    lines.append(f"  in all about {report['bytes_sent_total'] / 1e6:.2f} MB (plus Flower's framing)")
    lines += ["kept on this device:"] + [f"  {k}" for k in report["kept_on_device"]]
    for ledger in report.get("ledgers", []):
        lines += format_ledger(ledger)
    return "\n".join(lines)


def format_ledger(ledger: dict) -> list[str]:
    """One privacy ledger (an entry of :func:`describe_ledgers`) as lines for its owner."""
    spent = "unbounded" if ledger["spent_epsilon"] is None else f"{ledger['spent_epsilon']:.4g}"
    lines = [(f"privacy ledger of {ledger['owner_folder']} ({ledger['path']}): {len(ledger['runs'])} run(s), "
              f"spent epsilon {spent} and delta {ledger['spent_delta']:g}")]
    for r in ledger["runs"]:
        eps = "unbounded (no noise)" if r["epsilon"] is None else f"{r['epsilon']:.4g}"
        lines.append(f"  {r['run_id']}: epsilon {eps}, {r['kernel_source']} kernel, released "
                     f"{', '.join(r['releases']) or 'exact values'}")
    if "left_epsilon" in ledger:
        lines.append(f"  budget epsilon {ledger['budget_epsilon']:g} at delta {ledger['budget_delta']:g}: "
                     f"left epsilon {ledger['left_epsilon']:.4g}, delta {ledger['left_delta']:g}")
    return lines


def find_ledgers(path: Path) -> list[Path]:
    """Every privacy ledger ``fedtrak device check --ledger PATH`` shows: ``PATH`` itself if it is
    a file; in a folder, its own ledger (``PATH/privacy-ledger.json``) and one per owner folder in it
    (``PATH/*/privacy-ledger.json``: a device's ``store-dir`` holds one folder per owner,
    ``owner-<name>/`` or ``partition-<i>/``, each with its ledger, :mod:`fedtrak.client.node`).

    Raises:
        FedtrakError: naming ``PATH`` if it does not exist, or is a folder with no ledger in it or
            in any folder just below it.
    """
    from fedtrak.client.ledger import LEDGER_FILE

    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FedtrakError(f"--ledger {path} does not exist: give the device's store-dir (a ledger per owner "
                           f"lies in its owner-<name>/{LEDGER_FILE}) or a ledger file")
    found = [p for p in [path / LEDGER_FILE, *sorted(path.glob(f"*/{LEDGER_FILE}"))] if p.is_file()]
    if not found:
        raise FedtrakError(f"--ledger {path} holds no privacy ledger: neither {path / LEDGER_FILE} nor "
                           f"{path}/*/{LEDGER_FILE} exists (give the device's store-dir, whose owner folders, "
                           "owner-<name>/ or partition-<i>/, hold one each, or a ledger file)")
    return found


def describe_ledgers(path: Path, budget_epsilon: float | None = None, budget_delta: float | None = None
                     ) -> list[dict]:
    """Each ledger :func:`find_ledgers` finds under ``path``, as
    :func:`fedtrak.client.ledger.describe_ledger` shows it (with what is left of the budget
    ``budget_epsilon`` at ``budget_delta``, where given), plus ``owner_folder``: the folder it lies in.

    Raises:
        FedtrakError: as :func:`find_ledgers`, on a bad budget, or on a ledger that cannot be read.
    """
    from fedtrak.client.ledger import DEFAULT_BUDGET_DELTA, Budget, PrivacyLedger, describe_ledger

    budget = None if budget_epsilon is None else Budget(budget_epsilon, budget_delta or DEFAULT_BUDGET_DELTA)
    return [{"owner_folder": p.parent.name, **describe_ledger(PrivacyLedger(p), budget)} for p in find_ledgers(path)]


def image_shape(x: np.ndarray) -> tuple[int, int] | None:
    """The (height, width) to draw one example as, or ``None`` if it is not an image."""
    shape = x.shape[1:]
    if len(shape) == 3 and shape[0] in (1, 3):
        return int(shape[1]), int(shape[2])
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0] and shape[0] >= 16:
        side = math.isqrt(shape[0])
        return side, side
    return None


def write_strip(path: Path, x: np.ndarray, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> Path | None:
    """A PNG with one row per entry ``(label, example rows, scores)`` of the examples as images."""
    shape = image_shape(x)
    if shape is None or not rows:
        return None
    try:
        import matplotlib
    except ImportError:  # a bare SuperNode install: the .npz holds the ids, the images are optional
        log.info("matplotlib is not installed (pip install 'fedtrak[device]'): no image strip")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(idx) for _, idx, _ in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.1 * width, 1.3 * len(rows)), squeeze=False)
    for r, (label, idx, scores) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(idx):
                ax.imshow(np.asarray(x[idx[c]], dtype=np.float32).reshape(-1, *shape)[0], cmap="gray")
                ax.set_title(f"{scores[c]:+.2g}", fontsize=7)
        axes[r][0].text(-0.3, 0.5, label, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def read_results(folder: Path) -> dict:
    """What a ``topk`` run kept on this device: the arrays of ``topk.npz`` under ``folder``.

    ``folder`` is a results folder, a run folder of the store, or the store
    root (the most recent run's results are read).

    Raises:
        FedtrakError: if no results file is found or it is unreadable.
    """
    folder = Path(folder)
    candidates = [folder / "topk.npz", folder / "results" / "topk.npz",
                  *sorted(folder.glob("*/results/topk.npz"), key=lambda p: p.stat().st_mtime, reverse=True),
                  *sorted(folder.glob("*/*/results/topk.npz"), key=lambda p: p.stat().st_mtime, reverse=True)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FedtrakError(f"no topk.npz under {folder}: run with policy topk to keep results on the device")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise FedtrakError(f"cannot read {path}: {exc}") from exc
    out["path"] = path
    return out


def format_results(results: dict, queries: int = 5) -> str:
    """The kept results as text: per query its top proponents and opponents (row ids in the
    device's data), and the most self-influential examples."""
    pro_ids, pro = results["proponent_ids"], results["proponent_scores"]
    opp_ids, opp = results["opponent_ids"], results["opponent_scores"]
    lines = [f"{results['path']}: {len(pro_ids)} queries, top {pro_ids.shape[1]} kept (never released)"]
    texts = results.get("proponent_texts"), results.get("opponent_texts")
    for q in range(min(queries, len(pro_ids))):
        if texts[0] is not None and texts[1] is not None:  # a text task: the owner's own texts, row by row
            lines.append(f"query {q}:")
            lines += [f"  {kind} {i} ({s:+.3g}): {t}" for kind, ids, vals, txt in (
                ("+", pro_ids[q], pro[q], texts[0][q]), ("-", opp_ids[q], opp[q], texts[1][q]))
                for i, s, t in zip(ids, vals, txt)]
            continue
        lines.append(f"query {q}: proponents " + ", ".join(f"{i} ({s:+.3g})" for i, s in zip(pro_ids[q], pro[q])))
        lines.append("         opponents " + ", ".join(f"{i} ({s:+.3g})" for i, s in zip(opp_ids[q], opp[q])))
    if "suspect_ids" in results:
        lines.append("most self-influential (check their labels): " + ", ".join(
            f"{i} ({s:.3g})" for i, s in zip(results["suspect_ids"], results["suspect_self_influence"])))
    strip = Path(results["path"]).with_name("topk.png")
    if strip.is_file():
        lines.append(f"images: {strip}")
    return "\n".join(lines)
