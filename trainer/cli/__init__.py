"""The trainer's ``edgefleet`` command groups (entry-point plugins), one module per stage: parse arguments, call the stage, print the result."""
