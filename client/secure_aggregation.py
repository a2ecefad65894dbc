"""The client's side of secure aggregation: the four rounds as steps its handlers call, its identity
key, its state between rounds, and its masked Grams.

A client's protocol state (its X25519 private keys, self-mask seed, the
advertisements it accepted and the sealed shares it holds) lives on its own
disk between the rounds, beside its feature store, in a file only its owner
can read; it is deleted once the client has revealed its shares. The
Ed25519 identity key that signs its advertisements is kept under the store
root (one per client data owner), created on first use; the identity keys of
its peers are pinned there on first use, and a changed one is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtrak.client.featurize import stored_clip_scales, stored_gram
from fedtrak.client.node import Local
from fedtrak.client.store import FeatureStore
from fedtrak.errors import FedtrakError
from fedtrak.privacy.distributed import MIN_FRACTION_BITS, DistributedNoise, skellam_noise
from fedtrak.privacy.kinds import GRAM
from fedtrak.privacy.mechanisms import DPSettings, noise_rng
from fedtrak.private_files import private_dir, write_private
from fedtrak.secagg import fixedpoint
from fedtrak.secagg.fixedpoint import COUNT_FRACTION_BITS, FRACTION_BITS
from fedtrak.secagg.protocol import Advertisement, Client, SealedShares, raw_public, secagg_context
from fedtrak.wire.codecs import pack_upper
from fedtrak.wire.secagg import Revealed

IDENTITY_FILE = "secagg-identity.pem"
STATE_FILE = "secagg-state.json"
#: Peers' identity keys by node id, pinned on first use (beside the device's own identity key).
PINS_FILE = "secagg-peers.json"
#: The record of the one input this client contributed to a run's secure sum.
CONTRIBUTED_FILE = "secagg-contributed.json"


def identity_key(root: Path) -> Ed25519PrivateKey:
    """This client's Ed25519 identity key under ``root``, created (owner-only) on first use."""
    path = Path(root) / IDENTITY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise FedtrakError(f"secure-aggregation identity key {path} is unreadable: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise FedtrakError(f"{path} holds no Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    private_dir(path.parent)
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return key


def pin_identities(root: Path, keys: Mapping[int, bytes]) -> None:
    """Trust on first use: remember each peer's identity key by its node id in ``root`` (across runs
    and servers), and refuse a key that differs from the one pinned. The server relays the keys, so
    without pins it could put its own in the place of a peer's and read the share channels.

    Raises:
        FedtrakError: naming the peers whose key changed, or an unreadable pin file.
    """
    path = Path(root) / PINS_FILE
    try:
        pins = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise FedtrakError(f"pinned identity keys {path} are unreadable ({exc}): fix or move the file") from exc
    changed = sorted(n for n, key in keys.items() if pins.get(str(n), key.hex()) != key.hex())
    if changed:
        raise FedtrakError(f"the identity key of client(s) {', '.join(map(str, changed))} differs from the one this "
                           f"device pinned in {path}: the keys may be substituted in transit, so no shares are "
                           "sealed (if that device was reinstalled, remove its entry)")
    if any(str(n) not in pins for n in keys):
        pins.update({str(n): key.hex() for n, key in keys.items()})
        private_dir(path.parent)
        write_private(path, json.dumps(pins, indent=1).encode())


def _raw(key: X25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()).hex()


def save_state(store: FeatureStore, client: Client) -> None:
    """Keep ``client``'s protocol state in its store until the next round."""
    state = {"client": client.client, "context": client.context.hex(), "c_key": _raw(client.c_key),
             "s_key": _raw(client.s_key), "self_seed": client.self_seed.hex(), "threshold": client.threshold,
             "peers": [[a.client, a.c_public.hex(), a.s_public.hex(), a.signature.hex()]
                       for a in client.peers.values()],
             "received": [[s.sender, s.recipient, s.nonce.hex(), s.ciphertext.hex()]
                          for s in client.received.values()]}
    write_private(store.dir / STATE_FILE, json.dumps(state).encode())


def load_state(store: FeatureStore, identity: Ed25519PrivateKey, context: bytes) -> Client:
    """The state :func:`save_state` kept, for the protocol run ``context``.

    Raises:
        FedtrakError: if there is none (the client missed an earlier round) or it belongs to another run.
    """
    path = store.dir / STATE_FILE
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FedtrakError("no secure-aggregation state: this client did not take part in the earlier "
                           "rounds") from None
    except ValueError as exc:
        raise FedtrakError(f"secure-aggregation state {path} is corrupt: {exc}") from exc
    if bytes.fromhex(state["context"]) != context:
        raise FedtrakError("secure-aggregation state belongs to another protocol run")
    client = Client(int(state["client"]), identity, context,
                    X25519PrivateKey.from_private_bytes(bytes.fromhex(state["c_key"])),
                    X25519PrivateKey.from_private_bytes(bytes.fromhex(state["s_key"])),
                    bytes.fromhex(state["self_seed"]), threshold=int(state["threshold"]))
    client.peers = {int(c): Advertisement(int(c), bytes.fromhex(cp), bytes.fromhex(sp), bytes.fromhex(sig))
                    for c, cp, sp, sig in state["peers"]}
    client.received = {int(s): SealedShares(int(s), int(r), bytes.fromhex(n), bytes.fromhex(ct))
                       for s, r, n, ct in state["received"]}
    return client


def forget_state(store: FeatureStore) -> None:
    """Delete the protocol state (its secrets) once the shares are revealed."""
    (store.dir / STATE_FILE).unlink(missing_ok=True)


def encoded_grams(store: FeatureStore, checkpoints: list[int], count: float, dp: DPSettings,
                  threshold: int, fraction_bits: int, weighted: bool = False) -> tuple[np.ndarray, dict[str, float]]:
    """The client's input to the secure sum, before masking, and seconds per part.

    Layout: the fixed-point upper triangle (``fraction_bits``) of each
    checkpoint's Gram (of the clipped features under DP, plus this client's
    share of Skellam noise, sized for ``threshold`` survivors), then the
    example count (the already released, noised one under DP), an integer encoded at
    :data:`~fedtrak.secagg.fixedpoint.COUNT_FRACTION_BITS` so it decodes exactly whatever the Grams' bits.

    Raises:
        FedtrakError: on fraction bits outside the range the protocol allows.
    """
    if not MIN_FRACTION_BITS <= fraction_bits <= FRACTION_BITS:
        raise FedtrakError(f"fixed-point fraction bits {fraction_bits} outside [{MIN_FRACTION_BITS}, "
                           f"{FRACTION_BITS}]")
    start = time.perf_counter()
    scales = stored_clip_scales(store, checkpoints, dp) if dp.active else {}
    bound = dp.gram_weight if dp.active else np.inf
    grams = [stored_gram(store, m, scales.get(m), weighted, bound)[0] for m in checkpoints]
    gram_s = time.perf_counter() - start
    start = time.perf_counter()
    parts = [fixedpoint.encode(pack_upper(g), fraction_bits) for g in grams]
    if dp.active:
        noise = DistributedNoise(grams[0].shape[0], len(checkpoints), threshold, fraction_bits)
        variance = noise.client_variance(dp)
        rng = noise_rng()
        parts = [p + skellam_noise(len(p), variance, rng).view(np.uint64) for p in parts]
    parts.append(fixedpoint.encode(np.array([count], dtype=np.float64), COUNT_FRACTION_BITS))
    return np.concatenate(parts), {"gram": gram_s, "encode_and_noise": time.perf_counter() - start}


def _client(local: Local) -> Client:
    """This client's protocol state from its store, for this run."""
    return load_state(local.store, identity_key(local.store.dir.parent), secagg_context(local.job.run_id))


def advertise(local: Local, context: str) -> tuple[Advertisement, bytes]:
    """Round 1: fresh key pairs, signed with this client's identity key; returns the advertisement
    and the identity key's raw public bytes.

    Raises:
        FedtrakError: if the protocol's ``context`` is not this run's.
    """
    local.contract.allow_secure_gram()
    if context != local.job.run_id:
        raise FedtrakError("secure-aggregation context does not match the run")
    identity = identity_key(local.store.dir.parent)
    client = Client(local.node_id, identity, secagg_context(local.job.run_id))
    save_state(local.store, client)
    return client.advertise(), raw_public(identity.public_key())


def share(local: Local, adverts: list[tuple[Advertisement, bytes]], threshold: int) -> list[SealedShares]:
    """Round 2: check the neighbours' signatures; seal shares of this client's secrets to each.

    Raises:
        FedtrakError: if the request does not carry this client's own identity key, or a
            signature is invalid.
    """
    local.policy.check_threshold(threshold)  # the threshold this client's shares and noise are made for
    client = _client(local)
    identities = {a.client: Ed25519PublicKey.from_public_bytes(key) for a, key in adverts}
    own = identities.get(client.client)
    if own is None or raw_public(own) != raw_public(client.identity.public_key()):
        raise FedtrakError("the share request does not carry this client's own identity key")
    pin_identities(local.store.dir.parent, {a.client: key for a, key in adverts})
    sealed = client.share([a for a, _ in adverts], identities, threshold)
    save_state(local.store, client)
    return sealed


def masked_input(local: Local, sealed: list[SealedShares], checkpoints: list[int],
                 fraction_bits: int) -> tuple[np.ndarray, dict[str, float], list[int]]:
    """Round 3: the masked vector of this client's (noised) Grams and count, seconds per part, and
    the peers whose sealed shares did not open here (it masks with the others only; the server
    excludes the peers it names).

    A client contributes one input to a run's secure sum. The same request again (a resent
    message) gets the same vector back; another attempt (new keys, or other senders) is refused:
    its fresh noise would make a second noised sum the ledger does not count.

    Raises:
        FedtrakError: if this client already contributed another input to this run's sum.
    """
    local.contract.allow_secure_gram()
    items = local.contract.items(GRAM, checkpoints)
    client = _client(local)
    rejected = client.receive(sealed)
    opened = [s for s in sealed if s.sender in client.received]
    attempt = {"keys": raw_public(client.c_key.public_key()).hex(), "senders": sorted(client.received),
               "checkpoints": list(checkpoints), "fraction_bits": fraction_bits}
    marker = local.store.dir / CONTRIBUTED_FILE
    if marker.is_file() and json.loads(marker.read_text()) != attempt:
        raise FedtrakError(f"this client already contributed a noised input to run {local.job.run_id}'s secure sum; "
                           "another would carry fresh noise no ledger counts: start a new run (charged anew)")
    write_private(marker, json.dumps(attempt).encode())  # before anything is computed or sent
    seconds: dict[str, float] = {}

    def make() -> np.ndarray:
        values, parts = encoded_grams(local.store, checkpoints, local.released_count(), local.dp,
                                      client.threshold, fraction_bits, local.weighted)
        start = time.perf_counter()
        masked = client.masked_input(opened, values)
        seconds.update(parts, mask=time.perf_counter() - start)
        # charged as it leaves: the Grams at the noise this device's share guarantees with threshold survivors
        local.charge(dict.fromkeys(items, local.contract.secure_unit(client.threshold, fraction_bits)))
        return masked

    masked = local.store.released("secagg-masked-input", make)
    save_state(local.store, client)
    return masked, seconds, rejected


def unmask(local: Local, survivors: list[int]) -> Revealed:
    """Round 4: reveal one share per peer (self-mask seed if it survived, mask key if not); then
    forget the secrets."""
    revealed = _client(local).unmask(survivors)
    forget_state(local.store)
    return revealed
