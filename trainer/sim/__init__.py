"""Simulation and demo fixtures: telemetry windows, tiny packages, simulated streams and cameras, the demos. Imported by tests, benches and the demo only."""
