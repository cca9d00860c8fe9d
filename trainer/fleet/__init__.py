"""The fleet loop: trainer service, retraining and rollout policies, simulator and demo."""
