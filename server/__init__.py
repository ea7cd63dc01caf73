"""edgeloop server: API + dashboard, MQTT ingest, pipeline orchestration, registry, deployments.

Importing this package is cheap; heavy dependencies load in the modules that need them.
"""
