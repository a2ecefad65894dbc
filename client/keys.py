"""A SuperNode's authentication key pair, in the format Flower's node authentication expects.

``fedtrak keys --out DIR`` writes ``DIR/supernode`` (the private key, OpenSSH
format, owner-only) and ``DIR/supernode.pub`` (the public key, OpenSSH
format): an ECDSA key on the NIST P-384 curve, as ``flower-supernode
--auth-supernode-private-key`` and ``flwr supernode register`` read them.
The private key never leaves the device; the public key goes to whoever runs
the SuperLink, who registers it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtrak.errors import FedtrakError
from fedtrak.private_files import write_private


def make_node_keys(out: Path, name: str = "supernode", overwrite: bool = False) -> tuple[Path, Path]:
    """Create the key pair ``out/name`` and ``out/name.pub``; returns both paths.

    Raises:
        FedtrakError: if either file exists and ``overwrite`` is not set.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / name, out / f"{name}.pub"
    existing = [p.name for p in (private, public) if p.exists()]
    if existing and not overwrite:
        raise FedtrakError(f"{out} already holds {', '.join(existing)}; refusing to overwrite keys "
                           "(pass --force to replace them)")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), overwrite)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public
