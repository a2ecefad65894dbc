"""Text that ships with Debian: the fortunes collections, parsed into texts and their collections
(the natural owners), byte tokens a small language model reads, and the built-in text tasks on them
(fortunes-lm, fortunes-topic): one Flower simulation, federated equal to central."""

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


# The built-in text tasks: fortunes-lm (a byte-level language model) and fortunes-topic (which
# collection a text comes from), their seeded split, and what refuses a language model's labels.


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_the_text_tasks_split_is_seeded_disjoint_and_owned_by_their_collections(require_fortunes):
    from fedtrak.data import text_tasks as tt
    from fedtrak.data.modelout import IGNORE
    from fedtrak.data.tasks import load_task

    lm, topic = load_task("fortunes-lm"), load_task("fortunes-topic")
    assert lm.x_train.shape == (800, 128) and lm.x_query.shape == (80, 128) and lm.x_public.shape == (600, 128)
    assert lm.x_train.dtype == lm.y_train.dtype == np.int64 and lm.num_classes == VOCAB
    assert np.array_equal(lm.y_train, np.where(lm.x_train == PAD, IGNORE, lm.x_train))
    assert np.bincount(lm.train_groups).tolist() == [100] * 8 and lm.train_groups.tolist() == sorted(lm.train_groups)
    corpus = load_fortunes()
    owners = tt.draw_split(corpus, tt.LM_OWNERS, (100, 10, 0), "fortunes-lm")
    public = tt.draw_split(corpus, tt.LM_PUBLIC, (0, 0, 100), "fortunes-lm")
    assert [corpus.names[c] for c in np.unique(corpus.collection[owners.train])] == sorted(tt.LM_OWNERS)
    assert all(corpus.names[corpus.collection[i]] == tt.LM_OWNERS[g] for i, g in zip(owners.train, lm.train_groups))
    assert {corpus.names[c] for c in corpus.collection[public.public]} == {"cookie", "wisdom"}
    texts = [{corpus.texts[i] for i in split} for split in (owners.train, owners.query, public.public)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])  # no text in two splits
    assert not _rows(lm.x_train) & _rows(lm.x_query)
    again = tt.draw_split(corpus, tt.LM_OWNERS, (100, 10, 0), "fortunes-lm")
    other = tt.draw_split(corpus, tt.LM_OWNERS, (100, 10, 0), "fortunes-lm", seed=34)
    assert np.array_equal(again.train, owners.train) and not np.array_equal(other.train, owners.train)
    # fortunes-topic: four collections, the label is the collection, public texts of the same four
    assert topic.x_train.shape == (600, 128) and topic.x_query.shape == (80, 128) and topic.num_classes == 4
    assert np.array_equal(topic.y_train, topic.train_groups) and np.bincount(topic.y_public).tolist() == [50] * 4
    assert not (_rows(topic.x_train) & _rows(topic.x_query) or _rows(topic.x_train) & _rows(topic.x_public))


def test_a_text_split_names_a_missing_or_small_collection(tmp_path):
    from fedtrak.data.text_tasks import draw_split

    (tmp_path / "art").write_text("\n%\n".join(f"text {i}" for i in range(5)))
    (tmp_path / "work").write_text("one\n%\none\n%\ntwo\n")  # "one" twice: drawn from neither
    corpus = load_fortunes(tmp_path)
    with pytest.raises(FedtrakError, match=r"task fortunes-lm needs the fortunes collection 'people', which the "
                                           r"installed fortunes package lacks \(.* holds art, work\)"):
        draw_split(corpus, ("art", "people"), (2, 1, 0), "fortunes-lm")
    with pytest.raises(FedtrakError, match=r"draws 2 texts from the fortunes collection 'work', which holds 1 "
                                           r"distinct texts"):
        draw_split(corpus, ("art", "work"), (1, 1, 0), "fortunes-lm")
    split = draw_split(corpus, ("art",), (2, 1, 1), "t")
    assert len(set(split.train) | set(split.query) | set(split.public)) == 4


def test_the_text_tasks_load_without_the_package_for_a_device(tmp_path, monkeypatch):
    """``data=False`` (a SuperNode with its own data file) needs no fortunes package; the device
    reads and reports a language model's (n, 128) token labels."""
    from fedtrak.client.data import read_device_data
    from fedtrak.client.device import device_report
    from fedtrak.data import text_tasks
    from fedtrak.data.modelout import IGNORE
    from fedtrak.data.tasks import load_task

    reads = []

    def absent():  # as on a device without the package
        reads.append(1)
        raise FedtrakError("Debian's fortunes collections are not installed")

    monkeypatch.setattr(text_tasks, "load_fortunes", absent)
    lm, topic = load_task("fortunes-lm", data=False), load_task("fortunes-topic", data=False)
    assert not reads  # data=False read nothing
    for task, labels in ((lm, (0, 128)), (topic, (0,))):
        assert not task.has_data and task.input_shape == (128,) and task.x_train.dtype == np.int64
        assert task.y_train.shape == labels and task.y_train.dtype == np.int64
    ids, _ = byte_tokens(["a fortune", "another one, longer", "x", "the last"], 128)
    np.savez(tmp_path / "mine.npz", x=ids, y=np.where(ids == PAD, IGNORE, ids))
    x, y = read_device_data(tmp_path / "mine.npz", lm)
    assert x.shape == y.shape == (4, 128)
    with pytest.raises(FedtrakError, match=r"task fortunes-lm's query set is not on this device .*give --queries"):
        device_report("fortunes-lm", tmp_path / "mine.npz", proj_dim=32, checkpoints=1)
    report = device_report("fortunes-lm", tmp_path / "mine.npz", proj_dim=32, checkpoints=1, queries=80)
    assert report["labels"] == "token ids per position (33 predicted tokens)" and report["batch"]["finite"]
    np.savez(tmp_path / "flat.npz", x=ids, y=np.zeros(4, dtype=np.int64))
    with pytest.raises(FedtrakError, match=r"y has shape \(4,\), expected \(4, 128\)"):
        read_device_data(tmp_path / "flat.npz", lm)


def test_the_text_recipe_is_adam_and_a_short_training_beats_the_unigram_baseline(require_fortunes):
    """Adam for the text tasks, through the one training loop and DP-SGD's; four epochs on 256
    texts already predict the next byte better than always guessing the most common one."""
    import torch

    from fedtrak.data.checkpoints import accuracy, seeded_model, train_central
    from fedtrak.data.modelout import IGNORE
    from fedtrak.data.tasks import TrainConfig, load_task
    from fedtrak.privacy.training import dp_sgd_epochs

    with pytest.raises(FedtrakError, match="unknown optimizer 'rmsprop': use one of sgd, adam"):
        TrainConfig(optimizer="rmsprop")
    task = load_task("fortunes-lm", train_size=256, query_size=40)
    assert task.training.optimizer == "adam"
    assert isinstance(task.training.make_optimizer(torch.nn.Linear(2, 2).parameters()), torch.optim.Adam)
    targets = task.y_query[:, 1:][task.y_query[:, 1:] != IGNORE]
    seen = task.y_train[:, 1:][task.y_train[:, 1:] != IGNORE]
    unigram = float(np.mean(targets == np.bincount(seen).argmax()))
    before = accuracy(task, seeded_model(task, 0), task.x_query, task.y_query)
    trained = accuracy(task, train_central(task, 0, epochs=4), task.x_query, task.y_query)
    assert before < 0.05 and trained > unigram + 0.03, (before, unigram, trained)
    private = dp_sgd_epochs(task, seeded_model(task, 0), task.x_train[:32], task.y_train[:32], 1, 1.0, 1.0)
    assert all(torch.isfinite(p).all() for p in private.parameters())  # Opacus takes the transformer as it is


#: The small fortunes-lm run both sides make (the federated one from the central run's checkpoint).
LM_RUN = {"train_size": 48, "query_size": 6, "clients": 3, "partition": "natural", "proj_dim": 64, "epochs": 1,
          "checkpoints": 1}


@pytest.fixture(scope="module")
def lm_central(require_fortunes, tmp_path_factory):
    """fedtrak.attribute on a small subset of fortunes-lm: 3 natural owners, one checkpoint."""
    import fedtrak

    out = tmp_path_factory.mktemp("fortunes-lm")
    return fedtrak.attribute("fortunes-lm", out=out / "central", **LM_RUN), out


def test_fortunes_lm_is_attributed_centrally_with_finite_scores_per_collection(lm_central):
    from fedtrak.data.tasks import load_task

    central, _ = lm_central
    assert central.scores.shape == (6, 48) and np.isfinite(central.scores).all() and np.abs(central.scores).max() > 0
    groups = load_task("fortunes-lm", train_size=48, query_size=6).train_groups
    held = [set(groups[central.ids["index"][central.ids["client"] == owner]].tolist()) for owner in range(3)]
    assert all(held) and sum(map(len, held)) == len(set().union(*held)) == len(set(groups))  # whole collections


@pytest.mark.flower
def test_fortunes_lm_federated_equals_central_and_a_curious_server_attacks_membership_only(lm_central):
    """Three natural owners on Flower's simulation engine give the centralized scores (same
    checkpoint, projection and k); the reconstruction attacks, which rebuild continuous inputs,
    are skipped for token ids and refused when asked for."""
    import fedtrak
    from fedtrak.simulations.attacks.suite import attack_run

    central, out = lm_central
    settings = {k: v for k, v in LM_RUN.items() if k not in ("epochs", "checkpoints")}
    federated = fedtrak.simulate("fortunes-lm", out=out / "federated", policy="full",
                                 checkpoints=central.out / "checkpoints", **settings)
    scale = np.abs(central.scores).max()
    assert np.abs(federated.scores - central.scores).max() <= 1e-4 * scale
    np.testing.assert_allclose(federated.owner_scores, central.owner_scores, rtol=1e-4, atol=1e-4 * scale)
    block = attack_run(federated.out, trials=20)
    assert "token ids" in block["inversion"]["skipped"] and "skipped" in block["small_owner"]
    assert 0 <= block["membership"]["tpr"] <= 1
    with pytest.raises(FedtrakError, match=r"task fortunes-lm: the attack asks for inversion \(inversion, "
                                           r"small-owner\), which do not apply to it: its inputs are int64 token ids"):
        attack_run(federated.out, ("inversion",))


def test_a_language_models_token_labels_are_refused_where_one_class_per_example_is_read(require_fortunes, tmp_path):
    """Label skew, label flips and owner values per label read one class per example: refused by
    name before anything runs, for fortunes-lm (fortunes-topic, a classifier, takes them)."""
    from fedtrak.config.settings import Settings
    from fedtrak.data.tasks import load_task
    from fedtrak.server.preflight import preflight
    from fedtrak.simulations.attacks.suite import check_attackable
    from fedtrak.simulations.attribute import run_attribute

    lm = Settings().replaced(task="fortunes-lm", train_size=48, query_size=6, clients=3)
    why = r"needs one class label per example, and its labels are one token id per position, shape \(examples, 128\)"
    with pytest.raises(FedtrakError, match=rf"task fortunes-lm: partition dirichlet .*{why}.*: use partition iid"):
        preflight(lm.replaced(partition="dirichlet"))
    with pytest.raises(FedtrakError, match=rf"task fortunes-lm: label flips .*{why}.*: run without flip-fraction"):
        preflight(lm.replaced(flip_fraction=0.1))
    with pytest.raises(FedtrakError, match=rf"task fortunes-lm: owner-value label .*{why}"):
        run_attribute(lm.replaced(owner_value="label", out=str(tmp_path / "run")), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    topic = Settings().replaced(task="fortunes-topic", clients=3, partition="dirichlet", flip_fraction=0.1,
                                owner_value="label")
    load_task("fortunes-topic").check_label_settings(topic)
    with pytest.raises(FedtrakError, match=r"task fortunes-topic: fedtrak sweep .*its inputs are int64 token ids"):
        check_attackable(load_task("fortunes-topic"), "fedtrak sweep measures the reconstruction attacks")


def test_the_report_shows_query_texts_beside_their_top_training_texts_and_owners(lm_central):
    """A text task's report reads as text: each query, then its proponents and opponents with their
    example, owner, score and text (no image gallery)."""
    import html

    from fedtrak.data.tasks import load_task
    from fedtrak.simulations.report.page import write_report

    central, _ = lm_central
    task = load_task("fortunes-lm", train_size=48, query_size=6)
    page = write_report(central.out).read_text()
    assert "<table class='texts'>" in page
    assert html.escape(task.text_of(task.x_query[0])) in page
    top = int(np.argmax(central.scores[0]))
    owner = central.summary.owner_labels[int(central.ids["client"][top])]
    row = (f"<tr class='proponent'><td>proponent</td><td>#{central.ids['index'][top]}</td><td>{html.escape(owner)}"
           f"</td><td>{central.scores[0, top]:+.3g}</td><td>{html.escape(task.text_of(task.x_train[central.ids['index'][top]]))}")
    assert row in page


def test_a_devices_kept_results_show_its_own_texts(tmp_path):
    """``fedtrak device results`` on a text task's topk.npz prints each kept example's text under its
    query; byte ids read back as the text they came from."""
    from fedtrak.client.device import format_results, read_results
    from fedtrak.data.text import byte_text, byte_tokens

    ids, _ = byte_tokens(["Never trust a computer you can't throw out a window.", "caf\u00e9"], 16)
    assert byte_text(ids[1]) == "caf\u00e9" and byte_text(ids[0]) == "Never trust a co"
    np.savez(tmp_path / "topk.npz", proponent_ids=np.array([[4, 2]]), proponent_scores=np.array([[0.5, 0.25]]),
             opponent_ids=np.array([[7]]), opponent_scores=np.array([[-0.125]]),
             proponent_texts=np.array([["first text", "second"]]), opponent_texts=np.array([["third"]]))
    text = format_results(read_results(tmp_path))
    assert text.splitlines()[1:] == ["query 0:", "  + 4 (+0.5): first text", "  + 2 (+0.25): second",
                                     "  - 7 (-0.125): third"]


def test_a_device_keeps_its_top_texts_for_a_text_task_and_prints_them(lm_central, tmp_path, capsys):
    """The device's writing path on fortunes-lm: one owner's top proponents and opponents of the
    central scores, kept by ``keep_topk_on_device`` as a topk run's device keeps them, carry that
    owner's own texts (and no image strip of token ids); ``fedtrak device results`` prints them."""
    from types import SimpleNamespace

    from fedtrak.client.data import ClientData
    from fedtrak.client.local_scoring import ChunkedScores
    from fedtrak.client.releases import keep_topk_on_device
    from fedtrak.client.store import FeatureStore
    from fedtrak.data.tasks import load_task
    from fedtrak.simulations.cli import main
    from fedtrak.trak.scoring import top_k

    central, _ = lm_central
    task = load_task("fortunes-lm", train_size=48, query_size=6)
    mine = central.ids["client"] == 0
    index = central.ids["index"][mine]
    data = ClientData("owner-0", 0, task.x_train[index], task.y_train[index], index)
    scores = central.scores[:, mine]
    (pro, pro_val), (opp, opp_val) = top_k(scores, 2), top_k(-scores, 1)
    store = FeatureStore(tmp_path / "store", "run-1")
    local = SimpleNamespace(data=data, store=store, task=task)
    path = keep_topk_on_device(local, ChunkedScores(np.zeros(6), np.zeros(len(index)), np.zeros((1, 4)),
                                                    proponents=(pro, pro_val), opponents=(opp, -opp_val)), 2)
    kept = np.load(path)
    assert kept["proponent_ids"].tolist() == index[pro].tolist()
    assert kept["proponent_texts"][0, 0] == task.text_of(task.x_train[index[pro[0, 0]]])
    assert kept["opponent_texts"][5, 0] == task.text_of(task.x_train[index[opp[5, 0]]])
    assert not (store.results_dir / "topk.png").exists()  # token ids are no image
    assert main(["device", "results", str(store.dir), "--queries", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = task.text_of(task.x_train[index[pro[0, 0]]])
    assert lines[1:3] == ["query 0:", f"  + {index[pro[0, 0]]} ({pro_val[0, 0]:+.3g}): {first}"]
