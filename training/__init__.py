"""edgeloop training: synthetic data, golden sets, seed model, train / evaluate / export.

Modules (import them directly; this package imports nothing heavy at import time):

* :mod:`training.synth` -- deterministic synthetic factory frames, YOLO datasets, scenarios of
  domain shift (``SCENARIOS``, ``DEFAULT_SHIFT``).
* :mod:`training.golden` -- the fixed, versioned golden set and shifted evaluation sets.
* :mod:`training.ultralytics_env` -- Ultralytics offline (enforced by a network guard) and fast on CPU.
* :mod:`training.yolo` -- typed ``train`` / ``evaluate`` / ``export_onnx`` wrappers.
* :mod:`training.seed_model` -- the cached seed model per profile (``PROFILES``).
* :mod:`training.cli` -- ``edgeloop data`` commands.

Torch and Ultralytics belong to this package alone; it never imports ``server`` or ``edge_agent``.
"""
