"""The secure-aggregation protocol (Bonawitz et al., CCS 2017) as pure client and server steps.

Four rounds, each a function of what the previous one delivered, so that they
can ride on any transport (Flower query messages come next):

1. **advertise**: each client makes two X25519 key pairs (``c`` to encrypt
   its shares, ``s`` to agree mask seeds) and signs both public keys, with the
   round's context, under its Ed25519 identity key.
2. **share**: each client checks every advertisement's signature, draws its
   self-mask seed ``b``, splits ``b`` and its ``s`` private key t-of-n among
   the clients still present, and encrypts each pair of shares to its
   recipient with AES-GCM under an HKDF key from their ``c`` agreement.
3. **masked input**: each client sends ``x + PRG(b) + sum_v +-PRG(s_uv)``
   mod 2^64 over the clients that shared (``x``: its fixed-point vector).
4. **unmask**: the clients that sent an input reveal, for every client that
   shared, the ``b`` share if that client's input arrived and the ``s`` share
   if it dropped (never both); the server rebuilds the self masks of the
   survivors and the pairwise masks between survivors and dropped clients,
   and gets the sum of the survivors' inputs.

Every message carries the context (run and round) inside what is signed or
authenticated, so a message from another round or run is refused; a bad
signature, a wrong length, or fewer than ``t`` unmask replies raise
:class:`FedtrakError` naming the client or the shortfall; a sum is never
returned from an incomplete unmasking.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtrak.errors import FedtrakError
from fedtrak.secagg import masks, shamir

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    """A public key's 32 raw bytes."""
    return key.public_bytes(*RAW)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Advertisement:
    """Round 1 message: a client's two public keys, signed with its identity key."""

    client: int
    c_public: bytes
    s_public: bytes
    signature: bytes


@dataclass(frozen=True)
class SealedShares:
    """Round 2 message part: the shares of ``sender`` for ``recipient``, AES-GCM encrypted."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclass
class Client:
    """One client's state across the rounds."""

    client: int
    identity: Ed25519PrivateKey
    context: bytes
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: secrets.token_bytes(masks.SEED_BYTES))
    peers: dict[int, Advertisement] = field(default_factory=dict)
    received: dict[int, SealedShares] = field(default_factory=dict)
    threshold: int = 0

    def _signed(self, what: bytes) -> bytes:
        return self.context + b"|advertise|" + str(self.client).encode() + b"|" + what

    def advertise(self) -> Advertisement:
        """Round 1: the signed public keys."""
        c_pub, s_pub = raw_public(self.c_key.public_key()), raw_public(self.s_key.public_key())
        return Advertisement(self.client, c_pub, s_pub, self.identity.sign(self._signed(c_pub + s_pub)))

    def share(self, adverts: Sequence[Advertisement], identities: Mapping[int, Ed25519PublicKey],
              threshold: int) -> list[SealedShares]:
        """Round 2: verify the advertisements, then share ``b`` and the ``s`` key t-of-n among them."""
        self.peers = {a.client: verify_advert(a, identities, self.context) for a in adverts}
        if self.client not in self.peers:
            raise FedtrakError(f"client {self.client}: its own advertisement is missing from the list")
        if not 2 <= threshold <= len(self.peers):
            raise FedtrakError(f"client {self.client}: threshold {threshold} is impossible with "
                               f"{len(self.peers)} clients in its neighbourhood")
        self.threshold = threshold
        ids = sorted(self.peers)
        b_shares = shamir.split(self.self_seed, len(ids), threshold)
        s_shares = shamir.split(_raw_private(self.s_key), len(ids), threshold)
        out = []
        for pos, v in enumerate(ids):
            plain = b"|".join([str(self.client).encode(), str(v).encode(),
                               _share_bytes(b_shares[pos]), _share_bytes(s_shares[pos])])
            nonce = secrets.token_bytes(12)
            key = self._channel_key(v)
            out.append(SealedShares(self.client, v, nonce, AESGCM(key).encrypt(nonce, plain, self._aad(self.client, v))))
        return out

    def receive(self, sealed: Sequence[SealedShares]) -> list[int]:
        """Round 3, first half: open each peer's sealed shares now (not at unmask time) and keep those
        that open; returns the senders whose shares do not (failed authentication, wrong address,
        malformed), which this client then neither masks with nor reveals for.

        Raises:
            FedtrakError: on shares meant for another client or from a client that did not advertise
                (the server's routing, not a peer, is at fault then).
        """
        self.received, rejected = {}, []
        for s in sealed:
            if s.recipient != self.client:
                raise FedtrakError(f"client {self.client}: got shares meant for client {s.recipient}")
            if s.sender not in self.peers:
                raise FedtrakError(f"client {self.client}: shares from client {s.sender}, which did not advertise")
            try:
                self._open(s)
            except FedtrakError:
                rejected.append(s.sender)
                continue
            self.received[s.sender] = s
        return sorted(rejected)

    def masked_input(self, sealed: Sequence[SealedShares], values: np.ndarray) -> np.ndarray:
        """Round 3: keep the shares sent to it (:meth:`receive`); return its masked fixed-point vector,
        masked pairwise with every peer whose shares opened."""
        self.receive(sealed)
        pair = [masks.pairwise_mask(self.client, v, self._mask_seed(v), len(values))
                for v in sorted(self.received) if v != self.client]
        return masks.masked(values, self.self_seed, pair)

    def _open(self, sealed: SealedShares) -> tuple[tuple[int, int], tuple[int, int]]:
        """The ``(b, s)`` shares inside one peer's sealed message.

        Raises:
            FedtrakError: naming the sender, if they fail authentication or are malformed.
        """
        v = sealed.sender
        try:
            plain = AESGCM(self._channel_key(v)).decrypt(sealed.nonce, sealed.ciphertext, self._aad(v, self.client))
        except (InvalidTag, ValueError):
            raise FedtrakError(f"client {self.client}: the shares of client {v} fail authentication") from None
        try:
            sender, recipient, b_share, s_share = plain.split(b"|")
            if int(sender) != v or int(recipient) != self.client:
                raise ValueError("addressed wrongly")
            return _parse_share(b_share), _parse_share(s_share)
        except ValueError:
            raise FedtrakError(f"client {self.client}: the shares of client {v} are malformed or "
                               "addressed wrongly") from None

    def unmask(self, survivors: Sequence[int]) -> dict[int, tuple[str, tuple[int, int]]]:
        """Round 4: for each client that shared, its ``b`` share (it survived) or its ``s`` share (it dropped)."""
        alive = set(survivors)
        if self.client not in alive:
            raise FedtrakError(f"client {self.client}: asked to unmask but not listed among the survivors")
        if len(alive) < self.threshold:  # Bonawitz et al.: never help unmask a sum of too few inputs
            raise FedtrakError(f"client {self.client}: only {len(alive)} survivors for a threshold of "
                               f"{self.threshold}; it reveals no share")
        out = {}
        for v, sealed in self.received.items():  # opened once already when they arrived
            b_share, s_share = self._open(sealed)
            out[v] = ("b", b_share) if v in alive else ("s", s_share)
        return out

    def _channel_key(self, peer: int) -> bytes:
        shared = self.c_key.exchange(X25519PublicKey.from_public_bytes(self.peers[peer].c_public))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"fedtrak secagg share channel|" + self.context).derive(shared)

    def _aad(self, sender: int, recipient: int) -> bytes:
        return self.context + b"|shares|" + f"{sender}->{recipient}".encode()

    def _mask_seed(self, peer: int) -> bytes:
        return masks.agreed_seed(self.s_key, X25519PublicKey.from_public_bytes(self.peers[peer].s_public),
                                 self.context)


def secagg_context(run_id: str) -> bytes:
    """The context a run's secure sum binds its signatures, channels and seeds to."""
    return f"fedtrak secagg|{run_id}|grams".encode()


def verify_advert(advert: Advertisement, identities: Mapping[int, Ed25519PublicKey], context: bytes) -> Advertisement:
    """The advertisement, if its signature holds for this context; an error naming the client otherwise."""
    key = identities.get(advert.client)
    if key is None:
        raise FedtrakError(f"client {advert.client} has no registered identity key")
    what = context + b"|advertise|" + str(advert.client).encode() + b"|" + advert.c_public + advert.s_public
    try:
        key.verify(advert.signature, what)
    except InvalidSignature:
        raise FedtrakError(f"client {advert.client}: advertisement signature is invalid "
                           "(tampered, or from another run or round)") from None
    return advert


def _share_bytes(share: tuple[int, int]) -> bytes:
    return f"{share[0]}:{share[1]:x}".encode()


def _parse_share(raw: bytes) -> tuple[int, int]:
    x, y = raw.split(b":")
    share = int(x), int(y, 16)
    if share[0] < 1:
        raise ValueError(f"share x = {share[0]}")
    return share


class MaskedTotal:
    """The running sum mod 2^64 of masked inputs, folded as they arrive, and a SHA-256 digest of
    each input in it: an input can be taken out again only by presenting the same vector."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.total = np.zeros(length, dtype=np.uint64)
        self.digests: dict[int, bytes] = {}

    def _checked(self, client: int, vector: np.ndarray) -> np.ndarray:
        y = np.asarray(vector)
        if y.shape != (self.length,) or y.dtype != np.uint64:
            raise FedtrakError(f"client {client}: masked input has shape {y.shape} and dtype {y.dtype}, "
                               f"expected ({self.length},) uint64")
        return y

    def add(self, client: int, vector: np.ndarray) -> None:
        """Fold in one client's masked input (once)."""
        y = self._checked(client, vector)
        if client in self.digests:
            raise FedtrakError(f"client {client}: a second masked input")
        self.total += y
        self.digests[client] = hashlib.sha256(y.tobytes()).digest()

    def remove(self, client: int, vector: np.ndarray) -> None:
        """Take a folded input out again; ``vector`` must be the very one folded in."""
        y = self._checked(client, vector)
        if self.digests.get(client) != hashlib.sha256(y.tobytes()).digest():
            raise FedtrakError(f"client {client}: the masked input given back is not the one it sent")
        self.total -= y
        del self.digests[client]

    @property
    def members(self) -> set[int]:
        """The clients whose inputs are in the total."""
        return set(self.digests)


def unmask_sum(
    adverts: Sequence[Advertisement],
    masked_inputs: Mapping[int, np.ndarray] | MaskedTotal,
    unmask_replies: Mapping[int, Mapping[int, tuple[str, tuple[int, int]]]],
    threshold: int,
    length: int,
    context: bytes,
    delivered: Mapping[int, Collection[int]] | None = None,
) -> np.ndarray:
    """The server's last step: the sum mod 2^64 of the survivors' inputs.

    ``adverts`` are those the clients shared among; ``masked_inputs`` maps each
    survivor to its masked vector (or is their :class:`MaskedTotal`); ``unmask_replies`` maps each replying
    survivor to its revealed shares; ``delivered`` maps each survivor to the
    clients whose shares the server delivered to it (its mask partners, with
    a sparse neighbour graph; default: every client that shared).

    Raises:
        FedtrakError: a masked vector of the wrong length (naming the client),
            fewer than ``threshold`` survivors or replies, a client revealing the
            wrong kind of share, or shares that do not rebuild a secret.
    """
    by_id = {a.client: a for a in adverts}
    if isinstance(masked_inputs, MaskedTotal):
        folded = masked_inputs
        if folded.length != length:
            raise FedtrakError(f"masked inputs of length {folded.length}, expected {length}")
    else:
        folded = MaskedTotal(length)
        for u, y in masked_inputs.items():
            folded.add(u, y)
    for u in folded.members:
        if u not in by_id:
            raise FedtrakError(f"client {u} sent a masked input but did not share keys")
    survivors = folded.members
    dropped = set(by_id) - survivors
    if len(survivors) < threshold or len(unmask_replies) < threshold:
        raise FedtrakError(f"only {len(survivors)} inputs and {len(unmask_replies)} unmask replies for a "
                           f"threshold of {threshold}: the sum cannot be unmasked (no result)")
    shares: dict[int, list[tuple[int, int]]] = {v: [] for v in by_id}
    for u, revealed in unmask_replies.items():
        check_revealed(revealed, shares, survivors, f"client {u}")
        for v, (_, share) in revealed.items():
            shares[v].append(share)
    total = folded.total.copy()
    for v in survivors:
        seed = _rebuild(shares[v], threshold, masks.SEED_BYTES, v)
        total = total - masks.expand(seed, length)
    partners = {u: set(by_id) if delivered is None else set(delivered[u]) for u in survivors}
    for v in dropped:
        if not any(v in partners[u] for u in survivors):
            continue  # no survivor masked with it: nothing to remove
        s_key = X25519PrivateKey.from_private_bytes(_rebuild(shares[v], threshold, 32, v))
        for u in (u for u in survivors if v in partners[u]):
            seed = masks.agreed_seed(s_key, X25519PublicKey.from_public_bytes(by_id[u].s_public), context)
            total = total - masks.pairwise_mask(u, v, seed, length)  # what survivor u added for v
    return total


def check_revealed(revealed: Mapping[int, tuple[str, tuple[int, int]]], given: Collection[int],
                   survivors: Collection[int], who: str) -> None:
    """Refuse revealed shares of a client whose shares ``who`` was not ``given``, or of the wrong
    kind (``b`` for a survivor, ``s`` for a dropped client).

    Raises:
        FedtrakError: naming ``who`` and the share.
    """
    for v, (kind, _) in revealed.items():
        if v not in given:
            raise FedtrakError(f"{who} revealed a share of client {v}, whose shares it was not given")
        want = "b" if v in survivors else "s"
        if kind != want:
            raise FedtrakError(f"{who} revealed a {kind!r} share of client {v}, expected {want!r}")


def _rebuild(shares: list[tuple[int, int]], threshold: int, length: int, client: int) -> bytes:
    if len(shares) < threshold:
        raise FedtrakError(f"only {len(shares)} shares of client {client} for a threshold of {threshold}")
    return shamir.combine(shares[:threshold], length)
