"""Drift and performance-decay monitoring: ``scoring`` (SciPy statistics on histograms), ``policy``
(pure decisions: thresholds, hysteresis, decay, group rounds), ``reference`` (one reference per model
version in the registry), ``monitor`` (consumes DriftReports, persists windows, acts), ``service``
(wires the monitor into a running server)."""
