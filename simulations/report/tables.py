"""The report's tables of examples for tasks that are not images: each query's top proponents and
opponents by training index, label and score, or, for text, as texts with their owners."""

from __future__ import annotations

import html

import numpy as np

from fedtrak.data.modelout import IGNORE
from fedtrak.data.tasks import Task
from fedtrak.errors import FedtrakError
from fedtrak.simulations.attacks.metrics import image_shape
from fedtrak.simulations.run_folder import RunFolder

#: Proponents shown per query (and per kind, for the index table).
TOP = 5


def image_shape_of(task: Task) -> tuple[int, int] | None:
    """The 2-d shape to draw an input as, or ``None`` if it is no single-channel image."""
    try:
        return image_shape(task.input_shape)
    except FedtrakError:
        return None


def label_text(y: np.ndarray) -> str:
    """One example's label as the report writes it: a class or value, or a language model's token
    labels by their count."""
    return str(y) if np.ndim(y) == 0 else f"{int((np.asarray(y) != IGNORE).sum())} tokens"


def proponent_table(run: RunFolder, task: Task, queries: np.ndarray) -> str | None:
    """For examples that are not images: each query's top proponents and opponents as a table of
    training index, label and score (``None`` without released scores)."""
    if image_shape_of(task) is not None or not run.has("scores") or not run.has("example_ids"):
        return None
    scores = run.array("scores", "the proponent table")
    index = np.asarray(run.array("example_ids", "the proponent table")["index"])
    rows = []
    for q in queries:
        s = np.asarray(scores[q], dtype=np.float64)
        order = np.argsort(-s, kind="stable")
        for kind, picks in (("proponent", order[:TOP]), ("opponent", order[::-1][:TOP])):
            rows += [(f"{q}", label_text(task.y_query[q]), kind, f"{index[j]}", label_text(task.y_train[index[j]]), f"{s[j]:+.4g}")
                     for j in picks]
    head = "".join(f"<th>{h}</th>" for h in ("query", "query label", "", "training index", "label", "score"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def text_table(run: RunFolder, task: Task, queries: np.ndarray) -> str | None:
    """For text tasks: each query's text beside its top proponents' and opponents' texts, with their
    owners and scores (``None`` without released scores or without a text view of the inputs)."""
    if task.as_text is None or not run.has("scores") or not run.has("example_ids"):
        return None
    scores = run.array("scores", "the text table")
    ids = run.array("example_ids", "the text table")
    index, client = np.asarray(ids["index"]), np.asarray(ids["client"])
    names = dict(enumerate(run.summary.owner_labels))
    rows = []
    for q in queries:
        s = np.asarray(scores[q], dtype=np.float64)
        order = np.argsort(-s, kind="stable")
        rows.append(("query", f"{q}", "", "", task.text_of(task.x_query[q]) or ""))
        for kind, picks in (("proponent", order[:TOP]), ("opponent", order[::-1][:2])):
            rows += [(kind, f"#{index[j]}", names.get(int(client[j]), str(client[j])), f"{s[j]:+.3g}",
                      task.text_of(task.x_train[index[j]]) or "") for j in picks]
    head = "".join(f"<th>{h}</th>" for h in ("", "example", "owner", "score", "text"))
    body = "".join(f"<tr class='{row[0]}'>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table class='texts'><tr>{head}</tr>{body}</table>"
