"""A user's own script, as a new user writes it (issue 32): no ``if __name__ == "__main__":`` guard,
a task from ``fedtrak.task_from_model`` at top level and never registered by hand, models trained by
the user's own loop. Evaluation's worker processes and Flower's virtual clients get the task by value
and never re-run the script; checkpoints the user brought are retrained with the task's recipe (its
``train_fn``, else its ``TrainConfig``), and the evaluation says which. A script's own model class
simulated over Flower's virtual clients, equal to the centralized run, is tests/test_user_tasks.py's
token model (one Ray start-up fewer than a script of its own here)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedtrak
from fedtrak.data.checkpoints import CheckpointInfo, write_checkpoint
from fedtrak.data.shipping import task_payload
from fedtrak.errors import FedtrakError
from fedtrak.results.summary import load
from fedtrak.simulations.evaluation.retrain import Recipe, retrain_margins

#: The top of every script: data, a model class and a plain torch training loop, all in ``__main__``.
PRELUDE = '''
import sys
import threading
import numpy as np
import torch
from torch import nn
import fedtrak

print("script body starts", flush=True)
out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(size=(150, 6)).astype(np.float32)
y = (x @ rng.normal(size=(6, 3))).argmax(1)
train, query = (x[:120], y[:120]), (x[120:], y[120:])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, inputs):
        return self.out(torch.tanh(self.hidden(inputs)))


def my_training(seed):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xt, yt = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    for _ in range(10):
        for i in range(0, len(yt), 30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 30]), yt[i:i + 30]).backward()
            opt.step()
    return model

'''


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "mine.py"
    script.write_text(PRELUDE + body)
    return subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=300, cwd=tmp_path)


def test_an_unguarded_script_evaluates_its_own_checkpoints_with_worker_processes(tmp_path):
    """Both traps of issue 32 at once: evaluate refused given checkpoints, and its spawned workers
    re-ran the script (3,581 log lines) or did not know its task. Now the body runs once, the LDS
    prints once, and nothing prints a traceback."""
    done = _run(tmp_path, '''
task = fedtrak.task_from_model("mine", Net(), train=train, query=query,
                               training=fedtrak.TrainConfig(epochs=5, batch_size=30, lr=0.1))
result = fedtrak.attribute(task, checkpoints=[my_training(0), my_training(1)], proj_dim=32, out=out + "/central")
block = fedtrak.evaluate(result, lds=True, subsets=4, workers=2, ceiling=False, cache_dir=out + "/cache")
print(f"LDS {block['lds']['lds']:.3f}")
''')
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert text.count("script body starts") == 1 and done.stdout.count("LDS ") == 1, text[-3000:]
    assert "Traceback" not in text and "\x1b[" not in text, text[-3000:]
    truth = load(tmp_path / "central").evaluation["lds"]["ground_truth"]
    assert truth["checkpoints"] == "given" and truth["algorithm"] == "central-sgd" and truth["epochs"] == 5
    assert "TrainConfig" in truth["recipe"] and "may differ" in truth["note"] and truth["models_trained"] == 4


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _small_task(name: str, **kwargs) -> fedtrak.Task:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    return fedtrak.task_from_model(name, Small(), train=(x[:48], y[:48]), query=(x[48:], y[48:]),
                                   training=fedtrak.TrainConfig(epochs=3, batch_size=16), **kwargs)


def _trained(task: fedtrak.Task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(task.x_train)), torch.from_numpy(task.y_train)).backward()
        opt.step()
    return model


def test_given_checkpoints_are_retrained_with_the_tasks_train_fn_and_the_evaluation_says_so(tmp_path):
    """Trap 2 of issue 32 ("cannot retrain checkpoints trained by 'given'"): with ``train_fn`` the
    user's own loop retrains ground truth, a fresh model in, under the subset's seed."""
    calls = []

    def my_loop(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
        calls.append((type(model), x.shape, str(y.dtype), seed))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
        return model

    task = _small_task("own-loop", train_fn=my_loop)
    result = fedtrak.attribute(task, checkpoints=[_trained(task, 0), _trained(task, 1)], proj_dim=8,
                               out=tmp_path / "run")
    block = fedtrak.evaluate(result, subsets=3, workers=1, ceiling=False, cache_dir=tmp_path / "cache")
    truth = block["lds"]["ground_truth"]
    assert (truth["algorithm"], truth["checkpoints"], truth["recipe"]) == ("train-fn", "given", "the task's train_fn")
    assert len(calls) == 3 and {c[:3] for c in calls} == {(Small, (24, 4), "int64")}
    assert len({c[3] for c in calls}) == 3  # each subset its own seed
    assert result.summary.evaluation["lds"]["ground_truth"] == truth


def test_checkpoints_of_an_algorithm_fedtrak_cannot_repeat_are_refused_naming_how_to_give_a_recipe(tmp_path):
    task = _small_task("foreign")
    folder = tmp_path / "theirs"
    write_checkpoint(folder, task.name, _trained(task, 0).state_dict(),
                     [CheckpointInfo(0, "ckpt_000.pt", None, "adam-with-tricks", None, None)])
    result = fedtrak.attribute(task, settings=fedtrak.Settings().replaced(checkpoints=1), checkpoints=folder,
                               proj_dim=8, out=tmp_path / "run")
    with pytest.raises(FedtrakError, match=r"trained by 'adam-with-tricks'.*'given'.*train_fn=.*training="):
        fedtrak.evaluate(result, subsets=3, workers=1, ceiling=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything ran


def test_a_task_that_exists_only_in_this_process_reaches_the_evaluation_workers(tmp_path):
    """Trap 3 of issue 32 ("unknown task 'tokens'" in the workers, which load a task by name): a task
    object registered only here travels to the spawned workers by value."""
    fedtrak.register_task("only-here", _small_task("only-here"))
    recipe = Recipe("only-here", 0, 0, "central-sgd", 2, 0, "iid", 2, 0.0, 0)
    mask = np.ones(48, dtype=bool)
    got = dict(retrain_margins(recipe, [(0, mask, 0), (1, mask, 0)], workers=2))
    assert got[0].shape == (12,) and np.array_equal(got[0], got[1])  # same seed, same model, in two workers


def _locked_factory() -> object:
    lock = threading.Lock()

    def make() -> nn.Module:
        with lock:
            return Small()

    return make


def test_a_task_that_cannot_be_pickled_is_refused_naming_the_fix():
    """A factory closed over a lock cannot travel to another process; cloudpickle handles lambdas
    and closures otherwise."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2
    fedtrak.register_task("locked", fedtrak.task_from_model("locked", _locked_factory(), (x, y), (x, y)))
    with pytest.raises(FedtrakError, match=r"task 'locked' cannot be sent to workers: TypeError: .*lock.*; build "
                                           r"what the model needs inside its factory"):
        task_payload("locked", "workers")
    fedtrak.register_task("lambda", fedtrak.task_from_model("lambda", lambda: Small(), (x, y), (x, y)))
    assert task_payload("lambda", "workers") and task_payload("digits-logreg", "workers") is None


def test_an_unshippable_task_is_refused_at_the_start_of_the_evaluation_and_of_a_simulation(tmp_path):
    done = _run(tmp_path, '''
log = open(out + "/train.log", "w")


def make():
    log.write("model made\\n")
    return Net()


task = fedtrak.task_from_model("logged", make, train=train, query=query,
                               training=fedtrak.TrainConfig(epochs=2, batch_size=30))
try:
    fedtrak.simulate(task, checkpoints=[my_training(0)], clients=2, proj_dim=16, out=out + "/sim")
except fedtrak.FedtrakError as exc:
    print("simulate:", exc)
result = fedtrak.attribute(task, checkpoints=[my_training(0)], proj_dim=16, out=out + "/central")
try:
    fedtrak.evaluate(result, subsets=4, workers=2, ceiling=False, cache_dir=out + "/cache")
except fedtrak.FedtrakError as exc:
    print("evaluate:", exc)
''')
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line for line in done.stdout.splitlines() if ":" in line}
    for step, where in (("simulate", "the simulation's virtual clients"), ("evaluate", "the evaluation's worker")):
        assert f"task 'logged' cannot be sent to {where}" in lines[step], done.stdout
        assert "Cannot pickle files" in lines[step] and "inside its factory" in lines[step], done.stdout
    assert not (tmp_path / "sim" / "summary.json").exists()
    assert not list((tmp_path / "cache").glob("*/subset-*.npz"))  # no model was trained


@pytest.mark.flower
def test_a_federated_training_without_updates_names_a_clients_reason_once_and_plainly(tmp_path, capfd):
    """Flower logs a client's error reply at INFO only, so FedAvg's failure said "some rounds got no
    client update" and nothing of why; it names the first client's reason now (as much of it as the
    client tells the server), in one line."""
    from fedtrak.simulations.simulate import run_simulation

    settings = fedtrak.Settings().replaced(out=str(tmp_path / "sim"), clients=2, rounds=1, checkpoints=1, proj_dim=16)
    with pytest.raises(FedtrakError) as caught:
        run_simulation(settings, node_settings={"task": "someone-elses"})
    message = str(caught.value)
    assert "\n" not in message and message.startswith("FedAvg for checkpoint 0: some rounds got no client update "
                                                      "(a client failed: train: "), message
    printed = capfd.readouterr()
    assert "\x1b[" not in printed.out + printed.err and "Traceback" not in printed.out + printed.err
