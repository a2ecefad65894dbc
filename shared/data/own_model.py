"""A task from a user's own PyTorch model and data: arrays, torch Datasets or DataLoaders.

:func:`task_from_model` is the public way in (``fedtrak.task_from_model``): it
takes an ``nn.Module`` (or a function that builds one) and the training and
query data, and returns a :class:`~fedtrak.data.tasks.Task` that
:func:`fedtrak.attribute`, :func:`fedtrak.simulate` and :func:`fedtrak.register_task`
accept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtrak.data.inputs import call_model, numeric_array, to_tensors
from fedtrak.data.modelout import ClassificationMargin, ModelOutput
from fedtrak.data.tasks import Task, TrainConfig, TrainFn
from fedtrak.errors import FedtrakError

#: What can hold a data split: ``(x, y)`` arrays or tensors, a map-style Dataset of ``(x, y)``
#: pairs, or a DataLoader over one.
Data = tuple[Any, Any] | torch.utils.data.Dataset | torch.utils.data.DataLoader


def as_arrays(data: Data, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A data split as ``(x, y)`` numpy arrays, each float32, or int64 where it holds integers
    (token ids, class indices); ``x`` may be a dict of arrays or tensors, one per keyword the model
    takes (``input_ids``, ``attention_mask``): a structured array then
    (:func:`~fedtrak.data.inputs.numeric_array`).

    Raises:
        FedtrakError: naming ``what`` if it is none of the accepted forms or its items are not
            ``(input, label)`` pairs.
    """
    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: plain(a) for k, a in v.items()}
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)

    if isinstance(data, tuple) and len(data) == 2:
        x, y = plain(data[0]), plain(data[1])
    else:
        if isinstance(data, torch.utils.data.DataLoader):
            batches = list(data)
        elif isinstance(data, torch.utils.data.Dataset):
            batches = list(torch.utils.data.DataLoader(data, batch_size=1024, shuffle=False))
        else:
            raise FedtrakError(f"{what} must be (x, y) arrays, a torch Dataset or a DataLoader, got "
                               f"{type(data).__name__}")
        try:
            x = np.concatenate([np.asarray(b[0]) for b in batches])
            y = np.concatenate([np.asarray(b[1]) for b in batches])
        except (IndexError, TypeError, ValueError) as exc:
            raise FedtrakError(f"{what}: items must be (input, label) pairs: {exc}") from exc
    if np.ndim(y) == 0:  # the shape of one example's label is the output's to check (ModelOutput.labels)
        raise FedtrakError(f"{what}: labels must be one per example, got a single {np.asarray(y).dtype}")
    return numeric_array(x), numeric_array(y)


class FreshCopy:
    """A picklable model factory: a freshly initialized copy of a template module per call.

    What trains is initialized afresh (under the caller's seed, so checkpoint m starts from its own
    initialization): each layer by its own ``reset_parameters``; a Hugging Face model by its own
    ``init_weights`` (its layers' initialization scheme: transformers' ``Conv1D`` has no
    ``reset_parameters``); LoRA adapters (peft) as peft initializes them, ``A`` random and ``B``
    zero, so a fresh copy computes what its base model does. What does not train
    (``requires_grad=False``: a pretrained base under adapters, frozen blocks) is kept as the
    template has it. Being a class rather than a closure, it travels to worker processes and
    Flower's virtual clients with the task.
    """

    def __init__(self, template: nn.Module) -> None:
        self.template = copy.deepcopy(template).cpu()

    def __call__(self) -> nn.Module:
        """A fresh copy of the template: its trained parameters re-initialized, the rest kept."""
        out = copy.deepcopy(self.template)
        adapters = _adapters(out)
        in_adapters = {id(p) for parts in adapters.values() for held in parts.values() for p in held}
        for module in out.modules():
            own = list(module.parameters(recurse=False))
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and (not own or any(p.requires_grad and id(p) not in in_adapters for p in own)):
                reset()
        for model in _hugging_face_models(out):
            if any(p.requires_grad and id(p) not in in_adapters for p in model.parameters()):
                _init_hugging_face(model)
        fresh = {id(p) for p in _reset_adapters(out, adapters)}
        kept = dict(self.template.named_parameters())
        with torch.no_grad():  # frozen parameters, and adapters peft initializes from the base, as given
            for name, p in out.named_parameters():
                if not p.requires_grad or (id(p) in in_adapters and id(p) not in fresh):
                    p.copy_(kept[name])
        return out


def _hugging_face_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models (transformers' ``PreTrainedModel``, by what it has) in ``model``."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        if hasattr(module, "config") and callable(getattr(module, "init_weights", None)) and \
                callable(getattr(module, "_init_weights", None)):
            found.append(module)
            return
        for child in module.children():
            walk(child)

    walk(model)
    return found


def _init_hugging_face(model: nn.Module) -> None:
    """Initialize a Hugging Face model again with its own scheme (transformers marks what it has
    initialized, and skips it: the marks are cleared first)."""
    for item in (*model.modules(), *model.parameters(), *model.buffers()):
        if getattr(item, "_is_hf_initialized", False):
            item._is_hf_initialized = False
    with torch.no_grad():
        model.init_weights()


#: peft's LoRA weights that ``reset_lora_parameters`` initializes (per adapter name).
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _adapters(model: nn.Module) -> dict[tuple[nn.Module, str], dict[str, list[nn.Parameter]]]:
    """Each peft adapter layer's weights (found by what the layer has: ``adapter_layer_names``), keyed
    by ``(layer, adapter name)``, then by part (``lora_A``, ``lora_B``, ...)."""
    out: dict[tuple[nn.Module, str], dict[str, list[nn.Parameter]]] = {}
    for layer in model.modules():
        for part in getattr(layer, "adapter_layer_names", ()):
            held = getattr(layer, part, None)
            if isinstance(held, (nn.ModuleDict, nn.ParameterDict)):
                for name, item in held.items():
                    params = list(item.parameters()) if isinstance(item, nn.Module) else [item]
                    out.setdefault((layer, name), {})[part] = params
    return out


def _reset_adapters(model: nn.Module, adapters: dict[tuple[nn.Module, str], dict[str, list[nn.Parameter]]]
                    ) -> list[nn.Parameter]:
    """Initialize LoRA adapters afresh as peft does (``init_lora_weights`` ``True``: ``A`` as a
    Linear layer's weight, ``B`` zero; or ``"gaussian"``) and return the weights so initialized.
    Adapters that peft derives from the base weights (PiSSA, OLoRA, LoftQ, ...: the same every
    time) and DoRA's magnitudes are not among them: they are kept as given."""
    configs = next((m.peft_config for m in model.modules() if isinstance(getattr(m, "peft_config", None), dict)), {})
    done: list[nn.Parameter] = []
    with torch.no_grad():
        for (layer, name), parts in adapters.items():
            how = getattr(configs.get(name), "init_lora_weights", None)
            if (how is True or how == "gaussian") and callable(getattr(layer, "reset_lora_parameters", None)):
                layer.reset_lora_parameters(name, how)
                done += [p for part in _LORA_PARTS for p in parts.get(part, ())]
    return done


def model_factory(model: nn.Module | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A function returning a freshly initialized copy of ``model``: a :class:`FreshCopy` for a
    module instance; a function is used as it is.

    Raises:
        FedtrakError: if ``model`` is neither a module nor callable.
    """
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise FedtrakError(f"model must be an nn.Module or a function returning one, got {type(model).__name__}")
        return model
    return FreshCopy(model)


def task_from_model(
    name: str,
    model: nn.Module | Callable[[], nn.Module],
    train: Data,
    query: Data,
    *,
    public: Data | None = None,
    num_classes: int | None = None,
    output: ModelOutput | None = None,
    training: TrainConfig | None = None,
    clip_norm: float | None = None,
    train_fn: TrainFn | None = None,
    train_groups: Any = None,
    as_text: Callable[[np.ndarray], str] | None = None,
) -> Task:
    """A task from your own model and data.

    Args:
        name: the task's name (runs and checkpoint manifests record it; simulated clients and
            evaluation workers get the task object itself, by value: :mod:`fedtrak.data.shipping`).
        model: an ``nn.Module`` (checkpoints fedtrak trains start from fresh copies: what trains
            initialized afresh, frozen parameters kept, :class:`FreshCopy`) or a function that
            returns a new one (called as it is). TRAK differentiates the parameters that have
            ``requires_grad``: freeze the rest to choose them (the last blocks, LoRA adapters).
        train: the training data attributed to: ``(x, y)`` arrays or tensors, a torch Dataset of
            ``(input, label)`` pairs, or a DataLoader.
        query: the queries (test examples) whose predictions are explained, in the same forms.
        public: data the server may hold, disjoint from the owners' (in the same forms; default
            none): under differential privacy the kernel is then built from it (``kernel_source``
            ``auto`` picks ``public``, or ``hybrid`` with secure aggregation), which costs the
            owners no privacy.
        num_classes: number of classes (default: the largest label + 1 over every split; 1 for a
            regression; a language model's vocabulary size).
        output: the model output function (default: the classification margin, as TRAK's;
            :class:`~fedtrak.data.modelout.Regression` for real-valued targets,
            :class:`~fedtrak.data.modelout.SequenceMargin` for a causal language model, whose labels
            are token ids aligned with the inputs).
        training: how fedtrak trains checkpoints when it trains them (default: SGD as
            :class:`~fedtrak.data.tasks.TrainConfig`).
        clip_norm: default clip norm of projected features under differential privacy.
        train_fn: your own training loop, ``train_fn(model, x, y, seed) -> model``
            (:data:`~fedtrak.data.tasks.TrainFn`: a fresh model in, initialized under ``seed``; the
            trained model out). Evaluating checkpoints you give retrains ground truth with it;
            without it, with ``training`` (which may differ from how you trained yours).
        train_groups: each training example's natural owner (a hospital, a collection: any
            integer per example), which ``partition="natural"`` keeps (default: none).
        as_text: how one input reads as text, for text inputs (e.g. ``lambda x:
            tokenizer.decode(x["input_ids"], skip_special_tokens=True)``): the report and a device's
            kept results then show query and training texts (default: none).

    Raises:
        FedtrakError: if the data or model are malformed (naming what is wrong).
    """
    x_train, y_train = as_arrays(train, "train")
    x_query, y_query = as_arrays(query, "query")
    x_public, y_public = (None, None) if public is None else as_arrays(public, "public")
    if x_train.shape[1:] != x_query.shape[1:] or x_train.dtype.names != x_query.dtype.names:
        raise FedtrakError(f"train inputs have shape {x_train.shape[1:]}, queries {x_query.shape[1:]}")
    if train_fn is not None and not callable(train_fn):
        raise FedtrakError(f"task {name}: train_fn must be a function train_fn(model, x, y, seed) -> model, "
                           f"got {type(train_fn).__name__}")
    output = output or ClassificationMargin()
    splits = {"train": y_train, "query": y_query, **({} if y_public is None else {"public": y_public})}
    if not output.classes:
        classes = num_classes or 1
    elif all(np.issubdtype(y.dtype, np.integer) for y in splits.values()):
        classes = num_classes or int(max(y.max(initial=0) for y in splits.values())) + 1
    else:
        classes = num_classes or 0  # the labels' check below names the split that is not integer
    y_train, y_query, y_public = (output.labels(splits[s], classes, f"task {name}: {s}") if s in splits else None
                                  for s in ("train", "query", "public"))
    task = Task(name, model_factory(model), x_train, y_train, x_query, y_query, classes, output=output,
                training=training or TrainConfig(), clip_norm=clip_norm, x_public=x_public, y_public=y_public,
                train_fn=train_fn, train_groups=None if train_groups is None else np.asarray(train_groups),
                as_text=as_text)
    task.validate()
    make = task.make_model()
    with torch.no_grad():
        try:
            logits = call_model(make, to_tensors(x_query[:2], y_query[:2])[0])
        except Exception as exc:
            kind = ("named" if x_query.dtype.names else
                    "integer" if np.issubdtype(x_query.dtype, np.integer) else "floating-point")
            raise FedtrakError(f"task {name}: the model cannot take inputs of shape {x_query.shape[1:]} "
                               f"({kind}, {x_query.dtype}: fedtrak keeps integer inputs such as token ids "
                               f"integer, gives every other input as float32, and named inputs as keyword "
                               f"arguments): {type(exc).__name__}: {exc}") from exc
    try:
        output.check_outputs(logits, classes)
    except FedtrakError as exc:
        raise FedtrakError(f"task {name}: {exc}") from exc
    return task
