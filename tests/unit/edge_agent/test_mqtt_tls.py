"""The agent's TLS settings: pinned CA, TLS 1.2+, host name check, client certificate, server name."""

from __future__ import annotations

import socket
import ssl

import pytest

from edge_agent.mqtt_client import AgentMqtt, MqttTls
from edge_agent.settings import AgentSettings
from server.stack.tls import write_dev_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_dev_pki(tmp_path_factory.mktemp("pki"), clients=("dev-1",))


def test_context_trusts_only_the_pinned_ca_and_checks_the_host_name(pki):
    ctx = MqttTls(ca_file=pki.ca_file).context()
    cas = ctx.get_ca_certs()
    assert len(cas) == 1 and dict(x[0] for x in cas[0]["subject"])["commonName"] == "edgeloop dev CA"
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_certificate_needs_both_halves_and_must_match(pki, tmp_path):
    cert, key = pki.clients["dev-1"]
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        MqttTls(ca_file=pki.ca_file, cert_file=cert)
    MqttTls(ca_file=pki.ca_file, cert_file=cert, key_file=key).context()  # loads
    with pytest.raises(ssl.SSLError):
        MqttTls(ca_file=pki.ca_file, cert_file=cert, key_file=pki.server_key).context()


def test_configured_server_name_replaces_the_connected_host(pki):
    ctx = MqttTls(ca_file=pki.ca_file, server_name="broker.example").context()
    a, b = socket.socketpair()
    with a, b:
        wrapped = ctx.wrap_socket(a, server_hostname="127.0.0.1", do_handshake_on_connect=False)
        assert wrapped.server_hostname == "broker.example"
    plain = MqttTls(ca_file=pki.ca_file).context()
    a, b = socket.socketpair()
    with a, b:
        assert plain.wrap_socket(a, server_hostname="127.0.0.1",
                                 do_handshake_on_connect=False).server_hostname == "127.0.0.1"


def test_from_settings_wires_tls_outbox_and_backoff(pki, tmp_path):
    cert, key = pki.clients["dev-1"]
    settings = AgentSettings(device_id="dev-1", data_dir=tmp_path / "agent", mqtt_password="pw",
                             mqtt_tls_ca=pki.ca_file, mqtt_tls_cert=cert, mqtt_tls_key=key,
                             mqtt_tls_server_name="localhost", mqtt_reconnect_min_s=0.5, mqtt_reconnect_max_s=8,
                             mqtt_outbox_max_messages=7)
    agent = AgentMqtt.from_settings(settings)
    assert agent.tls == MqttTls(pki.ca_file, cert, key, "localhost")
    assert agent.outbox.path == tmp_path / "agent" / "outbox.db"
    assert agent.outbox.max_messages == 7
    assert agent._reconnect == (0.5, 8)
    with pytest.raises(ValueError, match="reconnect"):
        AgentMqtt("dev-1", "127.0.0.1", 1883, "pw", reconnect_min_s=10, reconnect_max_s=1)
