"""A simulated fleet: many devices speaking the real protocol from one process.

``device`` is the pure device model (which messages a command leads to, after what delay, with
offline / slow / refusing devices); ``fleet`` drives many MQTT clients from one asyncio loop;
``credentials`` loads or enrolls the devices' own credentials. It imports ``protocol`` and
``firmware_bundles`` only, never the server's or the agent's internals (the package-boundary
test checks it): what it knows of the server is the wire.
"""
