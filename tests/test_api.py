"""The public Python API: a user's own model and data, attributed from Python with results in memory."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedtrak
from fedtrak.data.tasks import load_task
from fedtrak.errors import FedtrakError

ROOT = Path(__file__).resolve().parents[1]


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 5)).astype(np.float32) + np.eye(3, 5, dtype=np.float32)[y] * 2
    return x, y


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


@pytest.fixture(scope="module")
def blob_task() -> fedtrak.Task:
    return fedtrak.task_from_model("blobs-net", Net(), train=_blobs(120, 0), query=_blobs(20, 1))


def test_a_task_from_arrays_datasets_and_loaders_is_the_same(blob_task):
    x, y = _blobs(120, 0)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    for train in (dataset, torch.utils.data.DataLoader(dataset, batch_size=7)):
        task = fedtrak.task_from_model("blobs-net", Net(), train=train, query=_blobs(20, 1))
        np.testing.assert_array_equal(task.x_train, blob_task.x_train)
        np.testing.assert_array_equal(task.y_train, blob_task.y_train)
    assert blob_task.num_classes == 3 and blob_task.input_shape == (5,)
    torch.manual_seed(0)
    a = blob_task.make_model()
    torch.manual_seed(1)
    b = blob_task.make_model()
    assert not torch.equal(a.hidden.weight, b.hidden.weight)  # each checkpoint starts from its own init


def test_bad_models_and_data_are_named():
    with pytest.raises(FedtrakError, match="returns shape .* expected \\(batch, 3\\) logits"):
        fedtrak.task_from_model("t", nn.Linear(5, 2), train=_blobs(30, 0), query=_blobs(5, 1), num_classes=3)
    with pytest.raises(FedtrakError, match="cannot take inputs of shape \\(5,\\)"):
        fedtrak.task_from_model("t", nn.Linear(4, 3), train=_blobs(30, 0), query=_blobs(5, 1))
    with pytest.raises(FedtrakError, match="train must be \\(x, y\\) arrays, a torch Dataset or a DataLoader"):
        fedtrak.task_from_model("t", Net(), train=[1, 2, 3], query=_blobs(5, 1))
    x, y = _blobs(30, 0)
    with pytest.raises(FedtrakError, match="train inputs contain NaN"):
        fedtrak.task_from_model("t", Net(), train=(np.full_like(x, np.nan), y), query=_blobs(5, 1))


def test_a_task_object_named_like_a_built_in_is_refused_not_replaced_by_it(blob_task, tmp_path):
    """A run loads its task by name: an object named like a built-in task would silently run as
    the built-in, so it is refused by name before anything is trained."""
    from dataclasses import replace

    with pytest.raises(FedtrakError, match=r"this Task object is named 'digits-logreg', a built-in task's name.*"
                                           r"replace\(task, name='my-task'\)"):
        fedtrak.attribute(replace(blob_task, name="digits-logreg"), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_registered_and_plugged_in_tasks_load_by_name(blob_task, monkeypatch):
    fedtrak.register_task("my-blobs", blob_task)
    assert load_task("my-blobs").num_train == 120
    with pytest.raises(FedtrakError, match="cannot register task 'digits-logreg'"):
        fedtrak.register_task("digits-logreg", blob_task)

    class Entry:
        name, value = "plugged-blobs", "somepackage:make"

        def load(self):
            return lambda: blob_task

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Entry()] if group == "fedtrak.tasks" else [])
    assert load_task("plugged-blobs").num_train == 120
    with pytest.raises(FedtrakError, match="unknown task 'nope'.*registered name"):
        load_task("nope")


def test_attribute_in_memory_with_the_users_own_checkpoints(blob_task, tmp_path):
    torch.manual_seed(3)
    models = [blob_task.make_model() for _ in range(2)]
    result = fedtrak.attribute(blob_task, checkpoints=models, out=tmp_path / "run", proj_dim=32, clients=4)
    assert result.scores.shape == (20, 120) and result.owner_scores.shape == (20, 4)
    assert result.owners == ["0", "1", "2", "3"] and result.summary.num_checkpoints == 2
    assert result.summary.resolved.proj_dim == 32 and result.summary.settings.projection.proj_dim == 32
    again = fedtrak.Result.load(tmp_path / "run")
    np.testing.assert_array_equal(again.scores, result.scores)
    np.testing.assert_allclose(result.owner_scores.sum(axis=1), result.scores.sum(axis=1), rtol=1e-4, atol=1e-6)
    with pytest.raises(FedtrakError, match="unknown setting\\(s\\) \\['proj_dimm'\\]"):
        fedtrak.attribute(blob_task, out=tmp_path / "bad", proj_dimm=3)


class TokenNet(nn.Module):
    """Token ids -> embedding -> mean over positions -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x).mean(dim=1))


def _tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.integers(0, 40, size=(n, 6))
    x[:, :3] = 10 * y[:, None] + rng.integers(0, 10, size=(n, 3))  # the first tokens tell the class
    return x, y


def test_integer_token_inputs_stay_integer_through_training_featurizing_and_scoring(tmp_path):
    """An nn.Embedding model gets its token ids as integers (0.2 cast them to float32 and the
    model refused them); a float input to it is refused naming the type, not only the shape."""
    task = fedtrak.task_from_model("tokens", TokenNet(), train=_tokens(60, 0), query=_tokens(8, 1))
    assert task.x_train.dtype == np.int64 and task.x_query.dtype == np.int64
    result = fedtrak.attribute(task, out=tmp_path / "run", proj_dim=16, checkpoints=2, epochs=2, clients=3)
    assert result.scores.shape == (8, 60) and np.all(np.isfinite(result.scores)) and np.abs(result.scores).max() > 0
    (x, y), (xq, yq) = _tokens(20, 0), _tokens(4, 1)
    with pytest.raises(FedtrakError, match=r"cannot take inputs of shape \(6,\) \(floating-point, float32"):
        fedtrak.task_from_model("tokens", TokenNet(), train=(x.astype(np.float32), y), query=(xq * 1.0, yq))
    with pytest.raises(FedtrakError, match=r"query inputs are float32, the training inputs int64: give every split integer"):
        fedtrak.task_from_model("tokens", TokenNet(), train=(x, y), query=(xq * 1.0, yq))


class NamedNet(nn.Module):
    """Called as Hugging Face models are: ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.out((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def test_named_inputs_reach_the_model_as_keyword_arguments(tmp_path):
    """A dict of arrays (input_ids, attention_mask) is a task's inputs: kept as integer fields of
    one structured array, given to the model as keyword arguments through training, featurizing
    and scoring; fields of different lengths, and a model that takes no such arguments, are named."""
    from fedtrak.data.inputs import numeric_array

    (x, y), (xq, yq) = _tokens(60, 0), _tokens(8, 1)
    named = {"input_ids": x, "attention_mask": np.ones_like(x)}
    task = fedtrak.task_from_model("named", NamedNet(), train=(named, y),
                                   query=({"input_ids": xq, "attention_mask": np.ones_like(xq)}, yq))
    assert task.x_train.dtype.names == ("input_ids", "attention_mask") and task.x_train["input_ids"].dtype == np.int64
    result = fedtrak.attribute(task, out=tmp_path / "run", proj_dim=16, checkpoints=2, epochs=2, clients=3)
    assert result.scores.shape == (8, 60) and np.all(np.isfinite(result.scores)) and np.abs(result.scores).max() > 0
    with pytest.raises(FedtrakError, match=r"one length each, got \{'input_ids': 60, 'attention_mask': 59\}"):
        numeric_array({"input_ids": x, "attention_mask": np.ones_like(x)[:59]})
    with pytest.raises(FedtrakError, match=r"cannot take inputs of shape \(\) \(named"):
        fedtrak.task_from_model("named", TokenNet(), train=(named, y), query=(named, y))


def test_public_data_from_python_makes_the_public_kernel_under_dp():
    """``public=`` holds the server's data on the task (0.2 took none, and a private run silently
    used the noisier private kernel); under DP ``auto`` then picks the public kernel."""
    from fedtrak.trak.kernel_sources import resolve_kernel_source

    task = fedtrak.task_from_model("blobs-public", Net(), train=_blobs(60, 0), query=_blobs(8, 1),
                                   public=_blobs(30, 2))
    assert task.x_public.shape == (30, 5) and task.y_public.dtype == np.int64
    assert resolve_kernel_source(fedtrak.Settings().replaced(epsilon=1.0), task) == "public"
    assert resolve_kernel_source(fedtrak.Settings(), task) == "private"  # no noise: the exact kernel
    x, y = _blobs(10, 3)
    with pytest.raises(FedtrakError, match="public inputs of shape \\(4,\\) do not match"):
        fedtrak.task_from_model("t", Net(), train=_blobs(30, 0), query=_blobs(5, 1), public=(x[:, :4], y))


def test_a_result_says_what_the_run_was_and_found(blob_task, tmp_path):
    """The repr names mode, data, projection, kernel source, privacy and, once evaluated, the LDS;
    ``attribute`` logs the answer the command line prints (0.2 printed nothing)."""
    import logging

    torch.manual_seed(3)
    said, handler = [], logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("fedtrak").addHandler(handler)
    try:
        result = fedtrak.attribute(blob_task, checkpoints=[blob_task.make_model()], out=tmp_path / "run",
                                   proj_dim=16, clients=4)
    finally:
        logging.getLogger("fedtrak").removeHandler(handler)
    assert said[0] == "top owners per query (share of the positive attribution):"
    assert "privacy: none (the centralized reference: all data in one place)" in said
    text = repr(result)
    assert text.startswith(f"Result({str(tmp_path / 'run')!r}: central run of blobs-net; 20 queries x 120 examples "
                           "of 4 owners; factorized k=16 of 75 parameters, M=1; kernel private; not private")
    assert "LDS" not in text
    result.summary = result.summary.with_evaluation(
        {"lds": {"lds": 0.61, "lds_over_ceiling": 0.7, "ceiling": {"ceiling": 0.87}}})
    assert repr(result).endswith("; LDS 0.610 (ceiling 0.870))")


def test_errors_to_a_python_caller_name_settings_the_python_way(blob_task, tmp_path):
    """The settings' "give either clip-norm or clip-quantile" reads "clip_norm" from Python, and the
    command line keeps its flags' spelling. A private run of a task without a clip norm takes the
    DP quantile (where 0.2 stopped with "set clip-norm or clip-quantile")."""
    from fedtrak.config.settings import DEFAULT_CLIP_QUANTILE, Settings
    from fedtrak.simulations.api import _settings

    with pytest.raises(FedtrakError, match=r"give either clip_norm or clip_quantile, not both$"):
        fedtrak.simulate(blob_task, out=tmp_path / "sim", epsilon=1, clip_norm=1.0, clip_quantile=0.5)
    assert Settings.in_python_words("give --noise-multiplier, not noise-multiplierx") == \
        "give noise_multiplier, not noise-multiplierx"
    assert blob_task.clip_norm is None
    assert _settings(blob_task, None, None, {"epsilon": 1}).privacy.clip_quantile == DEFAULT_CLIP_QUANTILE
    assert _settings(blob_task, None, None, {"epsilon": 1, "clip_norm": 2.0}).privacy.clip_quantile is None
    assert _settings(blob_task, None, None, {}).privacy.clip_quantile is None  # no noise, no clip


def test_import_fedtrak_is_light_and_names_its_api():
    """``import fedtrak`` loads neither torch nor Flower; the apps load without Opacus and scipy.stats
    (seconds that every simulated client and ClientApp process would pay), which come only where DP
    is trained or accounted, and the digits without scikit-learn."""
    code = ("import sys, fedtrak\n"
            "assert 'torch' not in sys.modules and 'flwr' not in sys.modules, sorted(sys.modules)\n"
            "assert sorted(fedtrak.__all__) == sorted(fedtrak._API)\n"
            "import fedtrak.client.app, fedtrak.server.app\n"
            "assert not {'opacus', 'scipy.stats'} & set(sys.modules), 'the apps import Opacus or scipy.stats'\n"
            "fedtrak.load_task('digits-logreg')\n"
            "assert 'sklearn' not in sys.modules, 'the digits import scikit-learn'\n"
            "print(fedtrak.attribute.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "attribute", proc.stderr


@pytest.mark.flower
def test_the_own_model_example_runs_and_federated_equals_central(tmp_path):
    """``examples/own_model``: a user's own model class and data (not a built-in task), attributed
    with ``fedtrak.attribute`` and ``fedtrak.simulate`` (10 virtual clients); equal to 1e-4."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model" / "run.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal to 1e-4" in proc.stdout
    central = fedtrak.Result.load(tmp_path / "central")
    federated = fedtrak.Result.load(tmp_path / "federated")
    assert federated.summary.mode == "private" and len(federated.summary.clients.clients) == 10
    np.testing.assert_allclose(federated.scores, central.scores, rtol=1e-4, atol=1e-4 * np.abs(central.scores).max())
