"""Data that ships with a package: scikit-learn's digits and Debian's Fashion-MNIST.

Nothing here downloads. Each loader returns float32 inputs and int64 labels as
numpy arrays, split into a training set and a query (test) set.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from fedtrak.errors import FedtrakError

#: Where Debian's ``dataset-fashion-mnist`` package puts its files. Override
#: with the ``FEDTRAK_FMNIST_DIR`` environment variable.
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Size of the digits training split; of the remaining 297 images, 149 are queries and 148 the
#: public split (data the server may hold: disjoint from training and queries).
DIGITS_TRAIN_SIZE = 1500
DIGITS_PUBLIC_SIZE = 148
#: Fashion-MNIST's public split: the last 1,000 of its 10,000 test images (the rest are queries).
FMNIST_PUBLIC_SIZE = 1000

#: Train inputs and labels, query inputs and labels, public inputs and labels.
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]

#: Shape of one input of each built-in data set (digits flattened, Fashion-MNIST as one channel).
DIGITS_SHAPE = (64,)
FMNIST_SHAPE = (1, 28, 28)


def load_digits_split() -> Split:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], split 1,500 train / 149 query / 148 public.

    The split is a fixed permutation (seed 0), so every machine gets the same
    training order and the same query set.
    """
    table = _digits_table()
    x = (table[:, :-1] / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, rest = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    query, public = rest[:-DIGITS_PUBLIC_SIZE], rest[-DIGITS_PUBLIC_SIZE:]
    return x[train], y[train], x[query], y[query], x[public], y[public]


#: The digits table scikit-learn ships (1,797 rows of 64 pixel values and the label), inside its package.
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def _digits_table() -> np.ndarray:
    """The digits as one (1797, 65) table, the label last: the file ``load_digits`` reads, read
    without importing scikit-learn, which takes about a second in every process that loads the
    digits (each simulated client, each evaluation worker); ``load_digits`` where the file is not
    found where it was."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).joinpath(*DIGITS_FILE)
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            if table.shape == (1797, 65):
                return table
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.column_stack([data.data, data.target])


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the MNIST format) into a numpy array."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise FedtrakError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FedtrakError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise FedtrakError(f"{path} is truncated: expected {shape}, got {body.size} bytes")
    return body.reshape(shape)


def load_fmnist_split() -> Split:
    """Fashion-MNIST as float32 images of shape (1, 28, 28): 60,000 train, the first 9,000 test
    images as queries and the last 1,000 as the public split."""
    root = Path(os.environ.get("FEDTRAK_FMNIST_DIR", FMNIST_DIR))
    names = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).is_file()]
    if missing:
        raise FedtrakError(
            f"Fashion-MNIST files not found in {root} ({', '.join(missing)}): "
            "install them with `sudo apt-get install dataset-fashion-mnist` "
            "or point FEDTRAK_FMNIST_DIR at a folder holding the four .gz files"
        )
    arrays = {k: _read_idx(root / n) for k, n in names.items()}
    to_x = lambda a: (a.astype(np.float32) / 255.0)[:, None, :, :]
    x_test, y_test, cut = to_x(arrays["xte"]), arrays["yte"].astype(np.int64), -FMNIST_PUBLIC_SIZE
    return to_x(arrays["xtr"]), arrays["ytr"].astype(np.int64), x_test[:cut], y_test[:cut], x_test[cut:], y_test[cut:]
