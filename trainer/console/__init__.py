"""The fleet manager console: REST API and pages on the trainer's store."""
