"""The built-in text tasks, ``fortunes-lm`` and ``fortunes-topic``, on Debian's fortunes collections.

Both read texts as :data:`LENGTH` byte tokens (:func:`fedtrak.data.text.byte_tokens`; longer texts
are cut) into a small causal transformer (:class:`fedtrak.data.models.ByteTransformer`), trained
with Adam.

``fortunes-lm``, a byte-level language model (output :class:`~fedtrak.data.modelout.SequenceMargin`:
a text's next-byte margins summed): its labels are the inputs with padding marked
:data:`~fedtrak.data.modelout.IGNORE`. The owners are 8 collections (:data:`LM_OWNERS`, each a
natural owner: ``train_groups`` is the collection's place in that list); from each a seeded draw of
:data:`LM_TRAIN` training texts and :data:`LM_QUERY` query texts. The public split, which the
server holds for the public kernel, is :data:`LM_PUBLIC_EACH` texts of each of 2 other
collections (:data:`LM_PUBLIC`), so it shares no owner.

``fortunes-topic``, which of 4 collections (:data:`TOPICS`) a text comes from (a classifier over the
same tokens, :class:`~fedtrak.data.modelout.ClassificationMargin`): from each collection a seeded
draw of :data:`TOPIC_TRAIN` training, :data:`TOPIC_QUERY` query and :data:`TOPIC_PUBLIC` public
texts (a classifier's public data needs labels, so it comes from the same collections, disjoint
from the rest); ``train_groups`` is the collection, which is also the label.

The draw (:func:`draw_split`) is the same on every machine: for the collection at place ``i`` of
its list, a permutation under ``numpy.random.default_rng([SPLIT_SEED, i])`` of its texts that occur
once in the whole package (a text repeated in two collections could otherwise be trained on and
queried), cut into train, query and public in that order; each split is then kept in package order,
collection by collection.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fedtrak.data import models
from fedtrak.data.modelout import IGNORE, ClassificationMargin, SequenceMargin
from fedtrak.data.tasks import Task, TrainConfig
from fedtrak.data.text import FORTUNES, PAD, VOCAB, Corpus, byte_text, byte_tokens, load_fortunes
from fedtrak.errors import FedtrakError

#: Tokens per text (bytes; longer texts are cut).
LENGTH = 128
#: The seed of both tasks' split.
SPLIT_SEED = 33
#: fortunes-lm's owners, each a natural owner, and its public collections (held by the server).
LM_OWNERS = ("art", "computers", "definitions", "people", "politics", "science", "songs-poems", "work")
LM_PUBLIC = ("cookie", "wisdom")
#: Texts drawn per owner collection (train, query) and per public collection.
LM_TRAIN, LM_QUERY, LM_PUBLIC_EACH = 100, 10, 300
#: fortunes-topic's classes, in label order.
TOPICS = ("computers", "people", "politics", "science")
#: Texts drawn per topic (train, query, public).
TOPIC_TRAIN, TOPIC_QUERY, TOPIC_PUBLIC = 150, 20, 50
#: The transformer's size: width, blocks, attention heads (46,273 parameters as a language model).
WIDTH, LAYERS, HEADS = 32, 2, 2


@dataclass(frozen=True)
class TextSplit:
    """Corpus indices of each split, and each index's collection as its place in the list drawn from."""

    train: np.ndarray
    train_groups: np.ndarray
    query: np.ndarray
    query_groups: np.ndarray
    public: np.ndarray
    public_groups: np.ndarray


def _collection(corpus: Corpus, name: str, task: str, once: np.ndarray) -> np.ndarray:
    """Corpus indices of the collection ``name``'s texts that occur ``once`` in the corpus."""
    if name not in corpus.names:
        raise FedtrakError(f"task {task} needs the fortunes collection {name!r}, which the installed fortunes "
                           f"package lacks ({FORTUNES} holds {', '.join(corpus.names)})")
    return np.flatnonzero((corpus.collection == corpus.names.index(name)) & once)


def draw_split(corpus: Corpus, collections: tuple[str, ...], sizes: tuple[int, int, int], task: str,
               seed: int = SPLIT_SEED) -> TextSplit:
    """Draw ``sizes = (train, query, public)`` texts from each of ``collections`` (see the module
    docstring); groups are each text's place in ``collections``.

    Raises:
        FedtrakError: naming a collection the corpus lacks or that holds too few texts.
    """
    picked: list[list[np.ndarray]] = [[], [], []]
    groups: list[list[np.ndarray]] = [[], [], []]
    counts = Counter(corpus.texts)
    once = np.array([counts[t] == 1 for t in corpus.texts], dtype=bool)
    for i, name in enumerate(collections):
        texts = _collection(corpus, name, task, once)
        if len(texts) < sum(sizes):
            raise FedtrakError(f"task {task} draws {sum(sizes)} texts from the fortunes collection {name!r}, "
                               f"which holds {len(texts)} distinct texts")
        order = np.random.default_rng([seed, i]).permutation(texts)
        start = 0
        for s, size in enumerate(sizes):
            picked[s].append(np.sort(order[start:start + size]))
            groups[s].append(np.full(size, i, dtype=np.int64))
            start += size
    cat = [np.concatenate(p).astype(np.int64) for p in picked]
    grp = [np.concatenate(g) for g in groups]
    return TextSplit(cat[0], grp[0], cat[1], grp[1], cat[2], grp[2])


def _ids(corpus: Corpus, index: np.ndarray) -> np.ndarray:
    return byte_tokens([corpus.texts[i] for i in index], LENGTH)[0]


def lm_labels(ids: np.ndarray) -> np.ndarray:
    """A causal LM's labels of byte ``ids``: the ids, with padding :data:`IGNORE` (not predicted)."""
    return np.where(ids == PAD, IGNORE, ids).astype(np.int64)


#: The recipes: Adam, no weight decay (lambda is then ``rel:1e-3``), one local epoch per FedAvg round
#: (10 rounds: about as many epochs as central training). fortunes-lm, central on its 800 texts: 15 s
#: of CPU, next-byte accuracy 0.267 on the queries (always the most common byte: 0.158; the best
#: guess from the byte before: 0.264). fortunes-topic: 6 s, accuracy 0.375 (chance 0.25).
LM_TRAINING = TrainConfig(epochs=8, batch_size=32, lr=1e-2, momentum=0.9, weight_decay=0.0, local_epochs=1,
                          optimizer="adam")
TOPIC_TRAINING = TrainConfig(epochs=5, batch_size=16, lr=1e-3, momentum=0.9, weight_decay=0.0, local_epochs=1,
                             optimizer="adam")
#: Default clip norms: the median norm of projected features (auto's projector, factorized, k = 512)
#: over the training texts of a checkpoint trained with the recipe: 99 for fortunes-lm (its output
#: sums a text's token margins) and 4.7 for fortunes-topic.
LM_CLIP, TOPIC_CLIP = 100.0, 5.0


def _empty(label_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of a task loaded without its data: none, shaped as its own."""
    return np.empty((0, LENGTH), dtype=np.int64), np.empty((0, *label_shape), dtype=np.int64)


def fortunes_lm(data: bool = True) -> Task:
    """The ``fortunes-lm`` task (see the module docstring); ``data=False``: its model only, with empty
    ``(0, LENGTH)`` int64 ids and labels (a device with its own data file needs no fortunes package)."""
    if data:
        corpus = load_fortunes()
        owners = draw_split(corpus, LM_OWNERS, (LM_TRAIN, LM_QUERY, 0), "fortunes-lm")
        public = draw_split(corpus, LM_PUBLIC, (0, 0, LM_PUBLIC_EACH), "fortunes-lm")
        x_train, x_query, x_public = (_ids(corpus, i) for i in (owners.train, owners.query, public.public))
        groups = owners.train_groups
    else:
        x_train, _ = _empty((LENGTH,))
        x_query = x_public = x_train
        groups = np.empty(0, dtype=np.int64)
    return Task("fortunes-lm", lambda: models.ByteTransformer(VOCAB, LENGTH, WIDTH, LAYERS, HEADS),
                x_train, lm_labels(x_train), x_query, lm_labels(x_query), num_classes=VOCAB,
                output=SequenceMargin(), training=LM_TRAINING, clip_norm=LM_CLIP, has_data=data,
                x_public=x_public, y_public=lm_labels(x_public), train_groups=groups, as_text=byte_text)


def fortunes_topic(data: bool = True) -> Task:
    """The ``fortunes-topic`` task (see the module docstring); ``data=False``: its model only."""
    if data:
        corpus = load_fortunes()
        split = draw_split(corpus, TOPICS, (TOPIC_TRAIN, TOPIC_QUERY, TOPIC_PUBLIC), "fortunes-topic")
        x_train, x_query, x_public = (_ids(corpus, i) for i in (split.train, split.query, split.public))
        y_train, y_query, y_public = split.train_groups, split.query_groups, split.public_groups
        groups = split.train_groups
    else:
        x_train, y_train = _empty(())
        x_query = x_public = x_train
        y_query = y_public = groups = y_train
    return Task("fortunes-topic",
                lambda: models.ByteTransformer(VOCAB, LENGTH, WIDTH, LAYERS, HEADS, num_classes=len(TOPICS)),
                x_train, y_train, x_query, y_query, num_classes=len(TOPICS), output=ClassificationMargin(),
                training=TOPIC_TRAINING, clip_norm=TOPIC_CLIP, has_data=data, x_public=x_public, y_public=y_public,
                train_groups=groups, as_text=byte_text)

