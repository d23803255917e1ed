"""Loss functions: pure functions on tensors, one per variant."""
