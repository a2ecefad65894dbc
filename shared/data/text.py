"""Text that ships: Debian's ``fortunes`` package, its collections as natural owners, as byte tokens.

The package holds 43 collections (computers, science, politics, literature, people, ...) of short
texts separated by lines holding a single ``%``: about 15,000 texts, a few hundred characters at
most each. Nothing here downloads: without the package, :func:`load_fortunes` says how to install
it. :func:`byte_tokens` turns texts into fixed-length ids a small language model reads: each text's
UTF-8 bytes shifted by one (0 is padding), with the attention mask of its real positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrak.errors import FedtrakError

#: Where Debian's fortunes package installs its collections.
FORTUNES = Path("/usr/share/games/fortunes")
#: Token ids: 0 pads, a byte b is b + 1.
PAD, VOCAB = 0, 257


@dataclass(frozen=True)
class Corpus:
    """Texts and the collection each comes from.

    Attributes:
        texts: every text, collection by collection, in file order.
        collection: per text, the index of its collection in ``names``.
        names: the collections' names, sorted.
    """

    texts: tuple[str, ...]
    collection: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _texts(path: Path) -> list[str]:
    """The texts of one collection file: blocks between lines holding a single ``%``."""
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    out, block = [], []
    for line in raw.split("\n"):
        if line.strip() == "%":
            out.append("\n".join(block).strip("\n"))
            block = []
        else:
            block.append(line)
    out.append("\n".join(block).strip("\n"))
    return [t for t in out if t.strip()]


def load_fortunes(root: Path = FORTUNES) -> Corpus:
    """Every collection of the fortunes package under ``root`` (one file per collection; its
    ``.dat`` index and ``.u8`` link are skipped).

    Raises:
        FedtrakError: if the package is not installed there, or holds no text.
    """
    if not root.is_dir():
        raise FedtrakError(f"the text tasks read Debian's fortunes package, which is not installed ({root} is "
                           "missing): apt-get install fortunes")
    names = sorted(p.name for p in root.iterdir() if p.is_file() and "." not in p.name)
    texts: list[str] = []
    collection: list[int] = []
    for i, name in enumerate(names):
        found = _texts(root / name)
        texts += found
        collection += [i] * len(found)
    if not texts:
        raise FedtrakError(f"{root} holds no fortunes: reinstall the fortunes package")
    return Corpus(tuple(texts), np.asarray(collection, dtype=np.int64), tuple(names))


def byte_text(ids: np.ndarray) -> str:
    """The text of one row of :func:`byte_tokens` ids (padding dropped; bytes cut mid-character are
    replaced)."""
    ids = np.asarray(ids).reshape(-1)
    return bytes((ids[ids != PAD] - 1).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def byte_tokens(texts: tuple[str, ...] | list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``, each ``(len(texts), length)`` int64: every text's UTF-8 bytes plus one, cut
    at ``length`` and padded with :data:`PAD`; the mask is 1 on the text's positions.

    Raises:
        FedtrakError: on a non-positive length.
    """
    if length < 1:
        raise FedtrakError(f"token length must be positive, got {length}")
    ids = np.zeros((len(texts), length), dtype=np.int64)
    for row, text in enumerate(texts):
        data = np.frombuffer(text.encode("utf-8")[:length], dtype=np.uint8).astype(np.int64) + 1
        ids[row, : len(data)] = data
    return ids, (ids != PAD).astype(np.int64)
