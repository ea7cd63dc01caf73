"""A development PKI for the embedded broker: one CA, a server certificate, client certificates.

For demos and tests only: production brokers get certificates from the operator's PKI. Keys
are ECDSA P-256 (fast to make, accepted by OpenSSL/Mosquitto and Python's ``ssl``); the
server certificate names ``localhost`` and ``127.0.0.1`` unless told otherwise, because
clients check the host name.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.stack import _proc

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """Write ``name.crt`` (0644) and ``name.key`` (0600) into ``folder``; returns both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        _proc.write_private(cert_path, self.cert_pem.decode(), mode=0o644)
        _proc.write_private(key_path, self.key_pem.decode(), mode=0o600)
        return cert_path, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + dt.timedelta(days=days)))


def make_ca(common_name: str = "edgeloop dev CA", days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(common_name), _name(common_name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, *, server_names: tuple[str, ...] = (), client: bool = False,
          days: int = 825) -> Issued:
    """A leaf certificate signed by ``ca``: for a server when ``server_names`` are given (DNS
    names or IP addresses, put in subjectAltName), for a client when ``client``."""
    if not server_names and not client:
        raise ValueError("a certificate is for a server (server_names), a client, or both")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (_builder(_name(common_name), ca.cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if server_names:
        alt: list[x509.GeneralName] = []
        for name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class DevPki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # common name -> (cert, key)


def write_dev_pki(folder: Path, *, server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
                  clients: tuple[str, ...] = (), ca_name: str = "edgeloop dev CA") -> DevPki:
    """Make a CA, a server certificate and one client certificate per name, written into
    ``folder`` as ``ca.crt`` (the CA key is not kept), ``server.crt/.key``, ``<name>.crt/.key``."""
    folder = Path(folder)
    ca = make_ca(ca_name)
    ca_file = folder / "ca.crt"
    folder.mkdir(parents=True, exist_ok=True)
    _proc.write_private(ca_file, ca.cert_pem.decode(), mode=0o644)
    server_cert, server_key = issue(ca, server_names[0], server_names=server_names).write(folder, "server")
    issued = {name: issue(ca, name, client=True).write(folder, name) for name in clients}
    return DevPki(ca_file, server_cert, server_key, issued)
