"""Rollouts: a registry version taken to a selected part of the fleet in waves, each wave gated on
the devices' shadow reports.

``spec`` is the request and policy shapes, ``gates`` and ``plan`` the pure decisions (what a
wave's evidence says, which devices a wave takes, what each device needs next), ``controller``
the reconciler that reads the database, decides with those, records the commands it issues and
publishes them, and ``api`` the JSON views and operator actions.
"""
