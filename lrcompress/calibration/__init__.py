"""Calibration: per-layer input statistics from data, and measured layer sensitivities."""
