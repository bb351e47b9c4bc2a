"""batch_engine: run large volumes of Claude requests cheaply and reliably (Message Batches or realtime)."""

__version__ = "0.1.0"
