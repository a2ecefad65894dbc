"""The client's on-disk feature store."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedtrak.client.store import FeatureStore
from fedtrak.errors import FedtrakError


def test_round_trip_is_memory_mapped_and_survives_a_restart(tmp_path):
    f = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    q = np.linspace(0, 1, 7, dtype=np.float32)
    FeatureStore(tmp_path, "run-1").write(2, f, q)
    again = FeatureStore(tmp_path, "run-1")  # a restarted client
    assert again.has(2) and not again.has(0)
    got_f, got_q = again.read(2)
    assert isinstance(got_f, np.memmap)
    np.testing.assert_array_equal(got_f, f)
    np.testing.assert_array_equal(got_q, q)
    assert not FeatureStore(tmp_path, "run-2").has(2)  # keyed by run
    assert not list((tmp_path / "run-1").glob(".tmp-*"))


def test_bad_input_and_corruption_are_named(tmp_path):
    store = FeatureStore(tmp_path, "r")
    with pytest.raises(FedtrakError, match="do not match"):
        store.write(0, np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(FedtrakError, match="not in the local store"):
        store.read(1)
    store.write(1, np.zeros((3, 2)), np.zeros(3))
    (store.dir / "ckpt_001" / "features.npy").write_bytes(b"garbage")
    with pytest.raises(FedtrakError, match="corrupt local store entry"):
        store.read(1)
    for bad in ("../escape", "", "a/b"):
        with pytest.raises(FedtrakError, match="run id"):
            FeatureStore(tmp_path, bad)


def test_a_noised_release_is_made_once_and_repeated(tmp_path):
    """A resent step gets the stored release back, not fresh noise (which would cost privacy again)."""
    store = FeatureStore(tmp_path, "run-1")
    draws = []

    def make() -> np.ndarray:
        draws.append(1)
        return np.random.default_rng().normal(size=(3, 4))

    first = store.released("gram-0", make)
    again = store.released("gram-0", make)
    assert np.array_equal(first, again) and len(draws) == 1
    assert not np.array_equal(store.released("gram-1", make), first) and len(draws) == 2
    (store.dir / "released" / "gram-0.npy").write_bytes(b"\x93NUMPY torn")  # damaged: no fresh noise drawn
    with pytest.raises(FedtrakError, match="gram-0.npy is unreadable.*will not draw fresh noise"):
        store.released("gram-0", make)
    assert len(draws) == 2
    assert np.array_equal(FeatureStore(tmp_path, "run-1").released("gram-1", make), store.released("gram-1", make))
    with pytest.raises(FedtrakError, match="release name"):
        store.released("../escape", make)


def test_secrets_and_stores_are_the_owners_only_even_with_a_stale_temp_file_or_a_planted_link(tmp_path):
    """Key files are 0600 whatever lies beside them: a stale world-readable temp file of the old
    fixed name is not reused, a link planted at the key's path is replaced, not followed; store
    folders are 0700 and kept releases 0600."""
    import os
    import stat

    from fedtrak.client.keys import make_node_keys
    from fedtrak.client.secure_aggregation import IDENTITY_FILE, identity_key
    from fedtrak.private_files import write_private

    def mode(path) -> int:
        return stat.S_IMODE(os.lstat(path).st_mode)

    keys = tmp_path / "keys"
    keys.mkdir()
    stale = keys / "supernode.tmp"
    stale.write_text("stale")
    os.chmod(stale, 0o644)
    private, _ = make_node_keys(keys)
    assert mode(private) == 0o600 and stale.read_text() == "stale"

    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    link = tmp_path / "secret"
    link.symlink_to(victim)
    write_private(link, b"key bytes")
    assert victim.read_text() == "not yours"  # the link was replaced, not followed
    assert not link.is_symlink() and mode(link) == 0o600 and link.read_bytes() == b"key bytes"
    with pytest.raises(FedtrakError, match="refusing to overwrite"):
        write_private(link, b"other", overwrite=False)

    root = tmp_path / "store"
    store = FeatureStore(root, "run-1")
    store.released("gram-0", lambda: np.ones(3))
    identity_key(root)
    assert mode(root) == mode(store.dir) == mode(store.dir / "released") == 0o700
    assert mode(store.dir / "released" / "gram-0.npy") == 0o600 and mode(root / IDENTITY_FILE) == 0o600
    assert not list(root.rglob("*.tmp"))


def test_where_a_device_keeps_its_store_and_whether_it_serves_every_score_are_node_settings_only():
    """The run config comes from the server: it can name neither the store root nor serve-full; the
    node config's own values are typed strictly ('false' is false; an unknown or renamed key is refused)."""
    from flwr.app import Context, RecordDict

    from fedtrak.client.node import node_settings
    from fedtrak.client.node_settings import DEFAULT_STORE

    server_says = {"store-dir": "/tmp/the-servers-choice", "serve-full": True}
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=server_says)
    assert node_settings(ctx).store_root == DEFAULT_STORE and node_settings(ctx).fields.serve_full is False
    ctx = Context(run_id=1, node_id=7, node_config={"store-dir": "/mine", "serve-full": "false"}, state=RecordDict(),
                  run_config=server_says)
    assert str(node_settings(ctx).store_root) == "/mine" and node_settings(ctx).fields.serve_full is False
    for bad, named in [({"serve-full": "maybe"}, "serve-full must be true or false"),
                       ({"allow-full": True}, "allow-full is now serve-full"),
                       ({"privacy-budgte": 1.0}, "unknown setting(s) ['privacy-budgte']"),
                       ({"privacy-budget": "-1"}, "privacy-budget must be a number > 0")]:
        with pytest.raises(FedtrakError, match=re.escape(named)):
            node_settings(Context(run_id=1, node_id=7, node_config=bad, state=RecordDict(), run_config={}))


def test_deployment_certificates_carry_key_usage_and_key_identifiers(tmp_path):
    """The server's leaf certificate says what its key may do (signatures and ECDHE, critical) and
    names its key (SKI) and its issuer's (AKI); the keys are the owner's only."""
    import os
    import stat

    from cryptography import x509

    from fedtrak.server.certs import make_certificates

    paths = make_certificates(tmp_path, ["10.0.0.5", "link.example"])
    leaf = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example", "localhost"]
    # the loopback address too: a SuperLink on 0.0.0.0 starts its helpers against 127.0.0.1
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]
    assert all(stat.S_IMODE(os.stat(paths[k]).st_mode) == 0o600 for k in ("ca.key", "server.key"))
