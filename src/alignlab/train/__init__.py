"""The one training loop shared by every algorithm: precision, accumulation, checkpoints, logging, distribution."""
