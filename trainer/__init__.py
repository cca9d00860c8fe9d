"""EdgeFleet trainer: model packages, training, evaluation, releases and the fleet loop.

Modules that need torch import it themselves; importing ``trainer`` (or its CLI) stays light.
"""
