"""Built-in tasks, user tasks by import path, and partitions."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrak.data.checkpoints import accuracy, train_central
from fedtrak.data.partition import partition
from fedtrak.data.tasks import BUILTIN_TASKS, load_task
from fedtrak.errors import FedtrakError


def test_digits_tasks_load_with_fixed_split():
    a, b = load_task("digits-logreg"), load_task("digits-mlp")
    assert a.x_train.shape == (1500, 64) and a.x_query.shape == (149, 64) and a.x_public.shape == (148, 64)
    seen = {row.tobytes() for row in a.x_train}  # the public split is held out from training and queries
    assert not any(row.tobytes() in seen for row in a.x_public)
    assert not {row.tobytes() for row in a.x_query} & {row.tobytes() for row in a.x_public}
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.num_params == 650 and b.num_params == 85002


def test_the_digits_read_without_scikit_learn_are_its_load_digits(monkeypatch):
    """The digits come from the file scikit-learn's ``load_digits`` reads (without importing
    scikit-learn: tests/test_api.py checks that), and from ``load_digits`` itself where that file
    is not found: the same table."""
    from fedtrak.data import datasets

    table = datasets._digits_table()
    monkeypatch.setattr(datasets, "DIGITS_FILE", ("datasets", "data", "not-there.csv.gz"))
    np.testing.assert_array_equal(datasets._digits_table(), table)
    assert table.shape == (1797, 65) and table.dtype == np.float64


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fmnist-mlp", "fmnist-cnn"])
def test_fmnist_tasks_load_and_train(require_fmnist, name):
    task = load_task(name, train_size=2000, query_size=500)
    assert task.x_train.shape == (2000, 1, 28, 28) and task.x_query.shape == (500, 1, 28, 28)
    assert 0.0 <= task.x_train.min() and task.x_train.max() <= 1.0
    model = train_central(task, seed=0, epochs=2)
    assert accuracy(task, model, task.x_query, task.y_query) > 0.6


def test_missing_fmnist_files_give_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTRAK_FMNIST_DIR", str(tmp_path))
    with pytest.raises(FedtrakError, match="apt-get install dataset-fashion-mnist"):
        load_task("fmnist-mlp")


def test_a_device_loads_a_builtin_task_without_its_data(tmp_path, monkeypatch):
    """A SuperNode reading its own file needs the model and input shape, not Fashion-MNIST."""
    from fedtrak.wire.compat import task_fingerprint

    monkeypatch.setenv("FEDTRAK_FMNIST_DIR", str(tmp_path))  # no files there
    with pytest.raises(FedtrakError, match="Fashion-MNIST files not found"):
        load_task("fmnist-mlp")
    bare = load_task("fmnist-mlp", data=False)
    assert not bare.has_data and bare.input_shape == (1, 28, 28) and bare.num_train == 0
    assert bare.num_params == 101770
    with pytest.raises(FedtrakError, match="without its data"):
        bare.subset(train_size=10)
    full, bare = load_task("digits-mlp"), load_task("digits-mlp", data=False)
    assert bare.input_shape == full.input_shape == (64,)
    assert task_fingerprint(bare, "rademacher", 64, 0) == task_fingerprint(full, "rademacher", 64, 0)


def test_unknown_task_lists_the_builtins():
    with pytest.raises(FedtrakError, match="unknown task 'cifar'.*digits-logreg"):
        load_task("cifar")


def test_user_task_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(
        "import numpy as np\n"
        "from fedtrak.data import models\n"
        "from fedtrak.data.tasks import Task\n"
        "def make():\n"
        "    rng = np.random.default_rng(0)\n"
        "    return Task('mine', lambda: models.logistic_regression(3, 2),\n"
        "                rng.random((30, 3), dtype=np.float32), rng.integers(0, 2, 30),\n"
        "                rng.random((4, 3), dtype=np.float32), rng.integers(0, 2, 4), num_classes=2)\n"
        "def not_a_task():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("mytask:make")
    assert task.name == "mine" and task.num_train == 30
    with pytest.raises(FedtrakError, match="returned int, not a Task"):
        load_task("mytask:not_a_task")
    with pytest.raises(FedtrakError, match="cannot import task"):
        load_task("mytask:missing")


def test_subset_sizes_are_checked():
    assert load_task("digits-logreg", train_size=100).num_train == 100
    with pytest.raises(FedtrakError, match="--train-size 5000"):
        load_task("digits-logreg", train_size=5000)


def test_builtin_names():
    assert set(BUILTIN_TASKS) == {"digits-logreg", "digits-mlp", "fmnist-mlp", "fmnist-cnn", "fortunes-lm",
                                  "fortunes-topic"}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_covers_every_example_once_and_is_seeded(scheme):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    p = partition(labels, 7, scheme, alpha=0.3, seed=4)
    order = p.order()
    assert sorted(order.tolist()) == list(range(1000))
    assert all(len(c) >= 1 for c in p.clients)
    q = partition(labels, 7, scheme, alpha=0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(p.clients, q.clients))
    r = partition(labels, 7, scheme, alpha=0.3, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(p.clients, r.clients))
    ids = p.example_ids()
    np.testing.assert_array_equal(ids["index"], order)
    for cid, idx in enumerate(p.clients):
        mine = ids[ids["client"] == cid]
        np.testing.assert_array_equal(mine["local"], np.arange(len(idx)))
        np.testing.assert_array_equal(mine["index"], idx)


def test_iid_is_balanced_and_dirichlet_is_skewed():
    labels = np.repeat(np.arange(10), 100)
    iid = partition(labels, 10, "iid", seed=0)
    assert {len(c) for c in iid.clients} == {100}
    skew = partition(labels, 10, "dirichlet", alpha=0.1, seed=0)
    top_share = [np.bincount(labels[c], minlength=10).max() / len(c) for c in skew.clients]
    iid_share = [np.bincount(labels[c], minlength=10).max() / len(c) for c in iid.clients]
    assert np.mean(top_share) > 0.5 > np.mean(iid_share)


def test_bad_partitions_are_refused():
    labels = np.zeros(5, dtype=np.int64)
    with pytest.raises(FedtrakError, match="cannot give 6 clients"):
        partition(labels, 6)
    with pytest.raises(FedtrakError, match="unknown partition scheme"):
        partition(labels, 2, "powerlaw")
    with pytest.raises(FedtrakError, match="alpha must be positive"):
        partition(labels, 2, "dirichlet", alpha=0.0)
