"""The ingest stage: device messages from the broker, routed and validated, written in batches and acknowledged once committed."""
