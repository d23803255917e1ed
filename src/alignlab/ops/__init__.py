"""Tensor operations shared by the losses: log-probabilities of completions."""
