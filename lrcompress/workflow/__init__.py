"""Workflow: the compress pipeline, recipes and their rules, run and sweep, the compression report."""
