"""The server's MQTT bus fans commands out through a real Mosquitto: a burst of thousands of QoS 1
commands all arrive, with more than paho's default 20 in flight (what the broker's CONNACK allows,
at most server.mqtt_bus.MAX_COMMANDS_IN_FLIGHT), and the broker does not disconnect the server."""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from protocol import TOPIC_ROOT
from protocol.messages import SamplingConfigCommand
from server.mqtt_bus import MAX_COMMANDS_IN_FLIGHT, MqttBus

pytestmark = [pytest.mark.integration]

COMMANDS = 3000


def test_a_burst_of_commands_all_arrive_with_a_wide_window(mqtt_broker):
    # A second server account reads every device's commands (server users read the whole tree).
    reader_user, reader_password = f"_fanout-reader-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    mqtt_broker.add_user(reader_user, reader_password, server=True)
    received: set[str] = set()
    lock, subscribed, done = threading.Lock(), threading.Event(), threading.Event()

    def on_message(_c, _u, msg) -> None:
        with lock:
            received.add(msg.topic)
            if len(received) == COMMANDS:
                done.set()

    reader = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=reader_user, protocol=mqtt.MQTTv5)
    reader.username_pw_set(reader_user, reader_password)
    reader.on_message = on_message
    reader.on_subscribe = lambda *_: subscribed.set()
    reader.on_connect = lambda c, *_: c.subscribe(f"{TOPIC_ROOT}/+/commands", qos=1)
    reader.connect(mqtt_broker.host, mqtt_broker.port)
    reader.loop_start()
    disconnects = []
    bus = MqttBus(mqtt_broker.host, mqtt_broker.port, mqtt_broker.server_username, mqtt_broker.server_password,
                  f"fanout-{uuid.uuid4().hex[:6]}", lambda topic, payload: None)
    try:
        assert subscribed.wait(10)
        bus.start()
        bus._client.on_disconnect = lambda *a: disconnects.append(a)
        window = bus._client._max_inflight_messages
        assert 20 < window <= MAX_COMMANDS_IN_FLIGHT
        for i in range(COMMANDS):
            bus.publish_command(f"cam-{i:05d}", SamplingConfigCommand(device_id=f"cam-{i:05d}", random_rate=0.01))
        assert done.wait(60), f"{len(received)} of {COMMANDS} commands arrived"
        assert not disconnects and bus.connected
    finally:
        bus.stop()
        reader.loop_stop()
        reader.disconnect()
