"""Telemetry: per-frame features, fixed-edge histograms and the window aggregator (pure, no I/O)."""
