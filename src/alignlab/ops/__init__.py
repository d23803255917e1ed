"""Tensor operations shared by the losses: completion log-probabilities, masked statistics, KL estimators."""
