"""Text that ships with Debian: the fortunes collections, parsed into texts and their collections
(the natural owners), and byte tokens a small language model reads."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrak.data.text import PAD, VOCAB, byte_tokens, load_fortunes
from fedtrak.errors import FedtrakError


def test_the_fortunes_collections_parse_into_texts_with_their_collection(require_fortunes):
    corpus = load_fortunes()
    assert len(corpus.names) == 43 and {"computers", "science", "politics", "literature"} <= set(corpus.names)
    assert 14_000 < len(corpus) < 16_500 and corpus.collection.shape == (len(corpus),)
    assert np.array_equal(np.unique(corpus.collection), np.arange(43))  # every collection holds texts
    assert all(t.strip() and "\n%\n" not in f"\n{t}\n" for t in corpus.texts)
    lengths = np.array([len(t) for t in corpus.texts])
    assert 120 < lengths.mean() < 250 and 50 < np.median(lengths) < 150  # short texts (15,217, mean 170 chars)


def test_a_corpus_is_read_from_any_folder_and_a_missing_package_is_named(tmp_path):
    (tmp_path / "one").write_text("first text\nof two lines\n%\nsecond\n%\n")
    (tmp_path / "one.dat").write_bytes(b"\x00\x01index")
    (tmp_path / "two").write_text("caf\u00e9 au lait\n")
    corpus = load_fortunes(tmp_path)
    assert corpus.texts == ("first text\nof two lines", "second", "caf\u00e9 au lait")
    assert corpus.collection.tolist() == [0, 0, 1] and corpus.names == ("one", "two")
    with pytest.raises(FedtrakError, match=r"not installed \(.*missing\): apt-get install fortunes"):
        load_fortunes(tmp_path / "absent")


def test_byte_tokens_shift_bytes_by_one_and_pad_with_zero():
    ids, mask = byte_tokens(["ab", "caf\u00e9", ""], 4)
    assert ids.tolist() == [[98, 99, 0, 0], [100, 98, 103, 196], [0, 0, 0, 0]]  # \u00e9 is 2 bytes: cut
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert ids.max() < VOCAB and PAD == 0
    with pytest.raises(FedtrakError, match="token length must be positive"):
        byte_tokens(["a"], 0)


def test_a_natural_partition_keeps_each_group_whole_and_balances_the_owners():
    from fedtrak.data.partition import partition

    groups = np.repeat([0, 1, 2, 3, 4], [50, 30, 20, 10, 5])
    parts = partition(np.zeros(115, dtype=np.int64), 3, "natural", groups=groups)
    owned = [set(groups[idx].tolist()) for idx in parts.clients]
    assert owned == [{0}, {1, 4}, {2, 3}] and [len(idx) for idx in parts.clients] == [50, 35, 30]
    assert sorted(np.concatenate(parts.clients).tolist()) == list(range(115)) and parts.scheme == "natural"
    with pytest.raises(FedtrakError, match="partition natural has 5 owner groups: use at most 5 clients"):
        partition(np.zeros(115, dtype=np.int64), 6, "natural", groups=groups)
    with pytest.raises(FedtrakError, match="partition natural needs each example's owner group"):
        partition(np.zeros(115, dtype=np.int64), 3, "natural")


def test_a_users_natural_owners_become_the_runs_owners(tmp_path):
    """``task_from_model(..., train_groups=...)`` with ``partition="natural"``: each owner's
    columns are exactly its group's examples."""
    from torch import nn

    import fedtrak

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    groups = np.repeat([7, 3, 5], 30)
    task = fedtrak.task_from_model("grouped", nn.Linear(4, 2), train=(x, y), query=(x[:6], y[:6]),
                                   train_groups=groups)
    result = fedtrak.attribute(task, out=tmp_path / "run", partition="natural", clients=3, checkpoints=1, epochs=2)
    for owner in range(3):
        members = result.ids["index"][result.ids["client"] == owner]
        assert len(set(groups[members].tolist())) == 1 and len(members) == 30
    with pytest.raises(FedtrakError, match="train_groups has shape"):
        fedtrak.task_from_model("grouped", nn.Linear(4, 2), train=(x, y), query=(x[:6], y[:6]),
                                train_groups=groups[:10])
