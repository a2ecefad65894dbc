"""Tasks: a model factory, training data, query data and the model output function.

Built-in tasks are named (``digits-logreg``, ``digits-mlp``, ``fmnist-mlp``,
``fmnist-cnn``, and the text tasks ``fortunes-lm`` and ``fortunes-topic``); a
user's own task is named by import path, ``package.module:function``,
Flower-style, where ``function()`` returns a :class:`Task`.

A device that brings its own data file needs only a task's model, output
function and input shape: ``load_task(name, data=False)`` gives a built-in task
without its data sets (a SuperNode for ``fmnist-mlp`` then needs no
Fashion-MNIST files and does not hold 60,000 images in memory).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedtrak.config.settings import Settings
from fedtrak.data import datasets, models
from fedtrak.data.inputs import finite
from fedtrak.data.modelout import ClassificationMargin, ModelOutput
from fedtrak.errors import FedtrakError

#: The optimizers a task's training recipe may name.
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """How the task's checkpoints are trained (minibatch SGD with momentum, or Adam).

    ``weight_decay`` is the coefficient of ``(wd / 2) * ||theta||^2`` added to
    the mean loss; fedtrak's principled default lambda derives from it.
    ``local_epochs`` is each client's epochs per FedAvg round: enough for
    FedAvg to converge about as far as centralized training does.
    ``optimizer`` is ``"sgd"`` (with ``momentum``) or ``"adam"`` (``momentum`` is its first
    moment's decay, beta1; the weight decay is the same term of the loss, not AdamW's): small
    transformers train badly with plain SGD. A FedAvg client starts a fresh optimizer every round.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    local_epochs: int = 3
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise FedtrakError(f"TrainConfig: unknown optimizer {self.optimizer!r}: use one of "
                               f"{', '.join(OPTIMIZERS)}")

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``params``: every training loop (central checkpoints, FedAvg's
        local epochs, DP-SGD through Opacus) builds it here."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(self.momentum, 0.999),
                                    weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


#: A user's training loop, ``train_fn(model, x, y, seed) -> model``: ``model`` is a freshly
#: initialized model of the task (initialized under ``seed``), ``x`` and ``y`` numpy arrays of the
#: examples to train on (a subset of the training split, as the task holds them), ``seed`` an int
#: for shuffling and any other randomness. It returns the trained model (the same object trained in
#: place, or a new one). Deterministic in ``seed`` is best: the ground-truth cache keeps each
#: subset's model, and the seed-noise ceiling measures whatever randomness remains.
TrainFn = Callable[[nn.Module, np.ndarray, np.ndarray, int], nn.Module]


@dataclass(frozen=True)
class Task:
    """Everything fedtrak needs to know about a learning problem.

    Attributes:
        name: the name it is loaded by (built-in name or import path).
        make_model: returns a freshly initialized model (call under a seed).
        x_train, y_train: training inputs (float32, or int64 token ids) and their labels (class
            indices, or real values for a regression output).
        x_query, y_query: query (test) inputs and labels attributed to the training set.
        num_classes: number of classes of the labels (the model's outputs per example: 1 for a
            regression).
        output: the model output function and out-to-loss weight.
        training: how checkpoints are trained.
        clip_norm: the default L2 clip norm C of projected features under
            differential privacy (about the median feature norm of trained
            checkpoints; ``None``: the user must give one).
        has_data: False for a task loaded for its model only
            (``load_task(..., data=False)``): its data arrays are empty, with
            the right input shape.
        x_public, y_public: the public split (``None``: none): data the server may hold, disjoint
            from the training data, from which it can build the kernel at no privacy cost.
        train_groups: each training example's natural owner (``None``: none), such as the
            collection a text comes from: what ``partition natural`` splits by.
        train_fn: how the user trains the model (``None``: not given), which ground-truth
            retraining repeats for checkpoints the user brought (:data:`TrainFn`); checkpoints
            fedtrak trains itself follow ``training``.
        as_text: how one input reads as text (``None``: inputs are not text), e.g. a tokenizer's
            decode: the report and a device's kept results show texts with it.
    """

    name: str
    make_model: Callable[[], nn.Module]
    x_train: np.ndarray
    y_train: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray
    num_classes: int
    output: ModelOutput = field(default_factory=ClassificationMargin)
    training: TrainConfig = field(default_factory=TrainConfig)
    clip_norm: float | None = None
    has_data: bool = True
    x_public: np.ndarray | None = None
    y_public: np.ndarray | None = None
    train_fn: TrainFn | None = None
    train_groups: np.ndarray | None = None
    as_text: Callable[[np.ndarray], str] | None = None

    def text_of(self, x: np.ndarray, limit: int = 160) -> str | None:
        """Input ``x`` (one example) as one line of text, cut at ``limit`` characters (``None`` when the
        task's inputs are not text, or the task's ``as_text`` fails on it)."""
        if self.as_text is None:
            return None
        try:
            text = " ".join(str(self.as_text(x)).split())
        except Exception:  # noqa: BLE001 - a user's decoder: the text is a courtesy, never a reason to fail a report
            return None
        return text if len(text) <= limit else text[: limit - 3] + "..."

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.y_train)

    @property
    def num_params(self) -> int:
        """Number of trainable parameters of the task's model."""
        return models.count_params(self.make_model())

    @property
    def class_labels(self) -> bool:
        """Whether each example's label is one class index: what label skew (partition dirichlet),
        label flips, owner values per label and the attacks' class priors read. A language model's
        labels are one token per position, a regression's real values."""
        return self.output.classes and np.ndim(self.y_train) == 1

    def require_class_labels(self, what: str, instead: str) -> None:
        """Refuse ``what``, which reads one class label per example, for a task without them.

        Raises:
            FedtrakError: naming the task, ``what``, why, and ``instead``.
        """
        if self.class_labels:
            return
        kind = ("real values (a regression)" if not self.output.classes else
                f"one token id per position, shape (examples, {', '.join(map(str, np.shape(self.y_train)[1:]))}) "
                f"(its output is {self.output.name}: a language model's)")
        raise FedtrakError(f"task {self.name}: {what} needs one class label per example, and its labels are "
                           f"{kind}: {instead}")

    def check_label_settings(self, settings: Settings) -> None:
        """Refuse, before a run starts, the settings that read one class label per example when the
        task has none: partition dirichlet, label flips, owner values per label.

        Raises:
            FedtrakError: naming the task, the setting and why.
        """
        if settings.partition.partition == "dirichlet":
            self.require_class_labels("partition dirichlet (each class split over the owners)",
                                      "use partition iid, or natural where the task has owner groups")
        if settings.flips().active:
            self.require_class_labels("label flips (a wrong class for some examples)", "run without flip-fraction")
        if settings.release.owner_value == "label":
            self.require_class_labels("owner-value label (owner values summed per query label)",
                                      "use owner-value all")

    def validate(self) -> None:
        """Check shapes, dtypes and finiteness of the data; raise FedtrakError if wrong."""
        if not self.has_data:
            return
        splits = [("train", self.x_train, self.y_train), ("query", self.x_query, self.y_query)]
        if self.x_public is not None or self.y_public is not None:
            if self.x_public is None or self.y_public is None:
                raise FedtrakError(f"task {self.name}: the public split needs both inputs and labels")
            if self.x_public.shape[1:] != self.x_train.shape[1:]:
                raise FedtrakError(f"task {self.name}: public inputs of shape {self.x_public.shape[1:]} do not "
                                   f"match the training inputs' {self.x_train.shape[1:]}")
            splits.append(("public", self.x_public, self.y_public))
        if self.train_groups is not None and np.shape(self.train_groups) != (len(self.y_train),):
            raise FedtrakError(f"task {self.name}: train_groups has shape {np.shape(self.train_groups)}, one "
                               f"group per training example needs ({len(self.y_train)},)")
        for split, x, y in splits:
            if len(x) != len(y):
                raise FedtrakError(f"task {self.name}: {split} has {len(x)} inputs but {len(y)} labels")
            if len(y) == 0:
                raise FedtrakError(f"task {self.name}: {split} set is empty")
            if not finite(x):
                raise FedtrakError(f"task {self.name}: {split} inputs contain NaN or infinity")
            self.output.labels(y, self.num_classes, f"task {self.name}: {split}")
            if np.issubdtype(x.dtype, np.integer) != np.issubdtype(self.x_train.dtype, np.integer) or \
                    x.dtype.names != self.x_train.dtype.names:
                raise FedtrakError(f"task {self.name}: {split} inputs are {x.dtype}, the training inputs "
                                   f"{self.x_train.dtype}: give every split integer inputs, or none")

    def subset(self, train_size: int | None = None, query_size: int | None = None) -> Task:
        """The same task on the first ``train_size`` / ``query_size`` examples
        of a fixed (seed 0) permutation, kept in dataset order."""
        task = self
        if not self.has_data and (train_size or query_size):
            raise FedtrakError(f"task {self.name} was loaded without its data: it has no subset")
        for kind, size in (("train", train_size), ("query", query_size)):
            if size is None:
                continue
            x, y = getattr(task, f"x_{kind}"), getattr(task, f"y_{kind}")
            if not 0 < size <= len(y):
                raise FedtrakError(f"--{kind}-size {size} is not in [1, {len(y)}] for task {self.name}")
            keep = np.sort(np.random.default_rng(0).permutation(len(y))[:size])
            task = replace(task, **{f"x_{kind}": x[keep], f"y_{kind}": y[keep]},
                           **({"train_groups": task.train_groups[keep]}
                              if kind == "train" and task.train_groups is not None else {}))
        return task


def _no_data(input_shape: tuple[int, ...]) -> datasets.Split:
    """Empty train, query and public arrays of a task loaded without its data."""
    x, y = np.empty((0, *input_shape), dtype=np.float32), np.empty(0, dtype=np.int64)
    return x, y, x, y, x, y


def _builtin(name: str, model: Callable[[], nn.Module], training: TrainConfig, clip: float,
             data: bool) -> Task:
    digits = name.startswith("digits")
    if data:
        arrays = datasets.load_digits_split() if digits else datasets.load_fmnist_split()
    else:
        arrays = _no_data(datasets.DIGITS_SHAPE if digits else datasets.FMNIST_SHAPE)
    x_train, y_train, x_query, y_query, x_public, y_public = arrays
    return Task(name, model, x_train, y_train, x_query, y_query, num_classes=10, training=training,
                clip_norm=clip, has_data=data, x_public=x_public, y_public=y_public)


def _text(name: str, data: bool) -> Task:
    from fedtrak.data import text_tasks  # it builds on Task and TrainConfig

    return text_tasks.fortunes_lm(data) if name == "fortunes-lm" else text_tasks.fortunes_topic(data)


#: Built-in tasks: name -> factory (its argument: load the data sets). Each trains on two CPU
#: cores in seconds to a minute. The number before ``data`` is the default clip norm: the median
#: norm of projected features measured on a trained checkpoint (4.7, 27, 21 and 21). The text
#: tasks, on Debian's fortunes collections, are built in :mod:`fedtrak.data.text_tasks`.
BUILTIN_TASKS: dict[str, Callable[[bool], Task]] = {
    "digits-logreg": lambda data: _builtin(
        "digits-logreg",
        lambda: models.logistic_regression(64, 10),
        TrainConfig(epochs=30, batch_size=64, lr=0.1, momentum=0.9, weight_decay=1e-3, local_epochs=9),
        5.0, data,
    ),
    "digits-mlp": lambda data: _builtin(
        "digits-mlp",
        lambda: models.mlp(64, (256, 256), 10),
        TrainConfig(epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4),
        25.0, data,
    ),
    "fmnist-mlp": lambda data: _builtin(
        "fmnist-mlp",
        lambda: models.mlp(784, (128,), 10),
        TrainConfig(epochs=3, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4),
        20.0, data,
    ),
    "fmnist-cnn": lambda data: _builtin(
        "fmnist-cnn",
        lambda: models.small_cnn(10),
        TrainConfig(epochs=2, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4),
        20.0, data,
    ),
    "fortunes-lm": lambda data: _text("fortunes-lm", data),
    "fortunes-topic": lambda data: _text("fortunes-topic", data),
}

#: Tasks registered in this process by :func:`register_task`: name -> factory.
_REGISTERED: dict[str, Callable[[], Task]] = {}
#: The entry-point group through which an installed package offers its tasks by name.
ENTRY_POINT_GROUP = "fedtrak.tasks"


def register_task(name: str, factory: Callable[[], Task] | Task) -> None:
    """Make a task loadable by ``name`` in this process (and, through :func:`fedtrak.simulate`, in
    its virtual clients).

    ``factory`` is a :class:`Task` or a function returning one (called once per process, when the
    task is first loaded). A SuperNode on another machine finds a user's task by import path
    (``package.module:function``) or through an installed package's entry point in the group
    ``fedtrak.tasks`` (see the docs on bringing your own model).

    Raises:
        FedtrakError: if ``name`` is a built-in task's or could be mistaken for an import path.
    """
    if name in BUILTIN_TASKS or ":" in name or not name.strip():
        raise FedtrakError(f"cannot register task {name!r}: built-in names and import paths are taken")
    _REGISTERED[name] = factory if callable(factory) and not isinstance(factory, Task) else (lambda: factory)
    cached_task.cache_clear()


def registered_tasks() -> dict[str, Callable[[], Task]]:
    """The tasks registered in this process (name -> factory)."""
    return dict(_REGISTERED)


def _factory(spec: str) -> Callable[[], Task]:
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise FedtrakError(f"cannot import task {spec!r}: {exc}") from exc
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == spec:
            try:
                return entry.load()
            except Exception as exc:
                raise FedtrakError(f"cannot load task {spec!r} from entry point {entry.value}: {exc}") from exc
    known = ", ".join(sorted(BUILTIN_TASKS) + sorted(_REGISTERED))
    raise FedtrakError(f"unknown task {spec!r}: use one of {known}, a registered name or an import path "
                       "package.module:function (a Task object exists only in the Python process that made it: "
                       "evaluate its run there, fedtrak.evaluate(result), or give the task by import path; a "
                       "Flower app's task is registered where its code is imported, e.g. fedtrak device check "
                       f"--app APP_FOLDER, or offered by an installed package's {ENTRY_POINT_GROUP!r} entry point)")


def load_task(spec: str, train_size: int | None = None, query_size: int | None = None,
              data: bool = True) -> Task:
    """Load a task by name: built-in, registered (:func:`register_task`), offered by an installed
    package's ``fedtrak.tasks`` entry point, or a user's ``package.module:function``.

    ``data=False`` leaves a built-in task's data sets unloaded (see the module
    docstring); a user's task factory is called as always and loads its own.

    Raises:
        FedtrakError: unknown name, import failure, or a factory that does not
            return a valid :class:`Task`.
    """
    if spec in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec](data)
    else:
        task = _factory(spec)()
        if not isinstance(task, Task):
            raise FedtrakError(f"task factory {spec!r} returned {type(task).__name__}, not a Task")
    task.validate()
    return task.subset(train_size, query_size)


@lru_cache(maxsize=4)
def cached_task(spec: str, train_size: int = 0, query_size: int = 0, data: bool = True) -> Task:
    """:func:`load_task` once per process and arguments (sizes of 0: the whole split).

    The server and every client of a run load the same task; in simulation
    they share processes, so this saves reloading it for every message.
    """
    return load_task(spec, train_size or None, query_size or None, data)
