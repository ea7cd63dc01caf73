"""The edge device daemon: frame sources, inference, shadow, sample collection + spool,
MQTT client and the OTA update state machine. Must not import server or training."""

AGENT_VERSION = "0.1.0"
