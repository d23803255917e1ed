"""Algorithms: glue between data, losses and the shared training loop."""
