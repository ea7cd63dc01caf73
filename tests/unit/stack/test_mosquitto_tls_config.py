"""The broker's optional TLS listener in the generated config, and the dev PKI behind it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.stack.mosquitto import BrokerTls, MosquittoBroker, TlsListener, render_config
from server.stack.tls import write_dev_pki

BASE = dict(host="127.0.0.1", port=18830, password_file=Path("/srv/mq/passwd"), acl_file=Path("/srv/mq/acl"),
            persistence_dir=Path("/srv/mq/data"), log_file=Path("/srv/mq/mosquitto.log"))


def _directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_no_tls_listener_unless_asked():
    lines = _directives(render_config(**BASE))
    assert [line for line in lines if line.startswith("listener")] == ["listener 18830 127.0.0.1"]
    assert not any(line.split()[0] in {"cafile", "certfile", "keyfile", "require_certificate"} for line in lines)


def test_tls_listener_keeps_password_auth_and_the_acl():
    tls = TlsListener(18883, Path("/srv/mq/tls/ca.crt"), Path("/srv/mq/tls/server.crt"),
                      Path("/srv/mq/tls/server.key"), require_certificate=True)
    lines = _directives(render_config(**BASE, tls_listener=tls))
    tail = lines[lines.index("listener 18883 127.0.0.1"):]
    assert tail == [
        "listener 18883 127.0.0.1",
        "protocol mqtt",
        # A setting of each listener (Mosquitto 2): without it a device could take another's session.
        "use_username_as_clientid true",
        "cafile /srv/mq/tls/ca.crt",
        "certfile /srv/mq/tls/server.crt",
        "keyfile /srv/mq/tls/server.key",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username false",
    ]
    # Global (per_listener_settings false): the same password file and ACL cover both listeners.
    assert "per_listener_settings false" in lines
    assert "allow_anonymous false" in lines and "password_file /srv/mq/passwd" in lines
    assert "acl_file /srv/mq/acl" in lines


def test_broker_copies_its_certificates_into_its_own_folder(tmp_path):
    pki = write_dev_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "mq", port=18830, tls=BrokerTls(pki.ca_file, pki.server_cert,
                                                                        pki.server_key, port=18883))
    text = broker.config_text()
    assert f"cafile {broker.tls_dir / 'ca.crt'}" in text
    assert "require_certificate false" in text
    assert broker.tls_port == 18883 and broker.tls_url.endswith(":18883")


def test_dev_pki_server_certificate_names_localhost_and_loopback(tmp_path):
    pki = write_dev_pki(tmp_path, clients=("dev-1",))
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    client = x509.load_pem_x509_certificate(pki.clients["dev-1"][0].read_bytes())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    assert client.issuer == ca.subject == server.issuer
    assert pki.server_key.stat().st_mode & 0o777 == 0o600
