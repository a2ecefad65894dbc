"""TLS material for a SuperLink: a certificate authority and a server certificate, made with the
``cryptography`` package's X.509 builder (no openssl, no hand-made crypto).

``fedtrak certs --out DIR --host NAME [--host NAME ...]`` writes

=============  ===========================================================================
``ca.crt``     the CA certificate: SuperNodes trust it (``--root-certificates``), and
               ``flwr`` names it in its federation config (``root-certificates``)
``ca.key``     the CA's private key (owner-only): keep it offline; it signs server certificates
``server.pem`` the SuperLink's certificate, for every given host name and IP address (and the
               loopback address and name, which the SuperLink's own helpers use)
``server.key`` its private key (owner-only)
=============  ===========================================================================

for ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
server.key``. Keys are ECDSA P-384; certificates are valid for 825 days (the CA for ten years).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtrak.errors import FedtrakError
from fedtrak.private_files import write_private

CA_DAYS = 3650
SERVER_DAYS = 825
FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


#: Names every SuperLink certificate carries besides the given hosts: a SuperLink listening on every
#: interface (``--host 0.0.0.0``) starts its own helper processes against 127.0.0.1, over TLS.
LOOPBACK = ("127.0.0.1", "localhost")


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in [*hosts, *(h for h in LOOPBACK if h not in hosts)]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host) or "/" in host:
                raise FedtrakError(f"--host {host!r} is neither an IP address nor a host name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: Path, hosts: Sequence[str], overwrite: bool = False) -> dict[str, Path]:
    """Create a CA and a SuperLink certificate for ``hosts`` in ``out``; returns the files by name.

    Raises:
        FedtrakError: with no host, a malformed host, or existing files and no ``overwrite``.
    """
    if not hosts:
        raise FedtrakError("give at least one --host (the SuperLink's host name or IP address)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FedtrakError(f"{out} already holds {', '.join(existing)}; refusing to overwrite keys "
                           "(pass --force to replace them)")
    san = _san(hosts)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtrak"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedtrak federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtrak"),
                             x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (x509.CertificateBuilder().subject_name(server_name).issuer_name(ca_name)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
                   .add_extension(san, critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=True,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    paths = {name: out / name for name in FILES}
    write_private(paths["ca.key"], _pem_key(ca_key), overwrite)
    write_private(paths["server.key"], _pem_key(server_key), overwrite)
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["server.pem"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths
