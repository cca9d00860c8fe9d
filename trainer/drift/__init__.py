"""Drift detection and label-free accuracy estimation (pure logic, no I/O)."""
